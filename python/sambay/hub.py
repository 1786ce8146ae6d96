"""``sambay pull``: a model from the Hugging Face Hub into sambay's model cache.

A checkpoint repository (config.json + safetensors) is downloaded with ``huggingface_hub``
(its cache, progress bars, retries with range requests; ``HF_TOKEN``, ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_ENDPOINT`` respected), converted, quantized and stored in
:mod:`sambay.cache`; the downloaded files are then deleted unless ``keep_hf``. A repository of
GGUF files is pulled directly (``file=`` picks one by pattern). ``huggingface_hub`` is the
``hub`` extra: ``pip install "sambay[hub]"``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from . import cache
from .errors import MissingDependencyError, PullError

log = logging.getLogger("sambay.hub")

DEFAULT_REPO = "microsoft/Phi-4-mini-flash-reasoning"
DEFAULT_QUANT = "Q4_K_M"
#: cache names of well-known repositories (others use their lower-cased repository name)
KNOWN_NAMES = {DEFAULT_REPO.lower(): "phi4-flash"}
#: the files conversion reads (convert/: config, safetensors, tokenizer, generation config)
CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.json", "merges.txt", "*.safetensors", "model.safetensors.index.json")
#: free bytes kept in reserve on top of the estimate
DISK_MARGIN = 64 * 2**20


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as err:
        raise MissingDependencyError(
            'pulling models needs huggingface_hub: pip install "sambay[hub]"') from err
    return huggingface_hub


def _endpoint() -> Optional[str]:
    # read per call: huggingface_hub reads HF_ENDPOINT once, when it is first imported
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _hf_cache_dir() -> Optional[str]:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def default_name(repo: str) -> str:
    """The cache name of a repository: ``phi4-flash`` for the official one, else its
    lower-cased repository name (``someone/Phi4-Flash-GGUF`` -> ``phi4-flash-gguf``)."""
    known = KNOWN_NAMES.get(repo.lower())
    if known:
        return known
    return re.sub(r"[^a-z0-9._-]+", "-", repo.split("/")[-1].lower()).strip("-._") or "model"


def _tqdm_class(progress: bool) -> Any:
    if progress:
        return None
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


@contextlib.contextmanager
def _hub_errors(repo: str, revision: Optional[str]) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line :class:`PullError` s."""
    _hf()
    import huggingface_hub.errors as errors
    where = repo + (f"@{revision}" if revision else "")
    try:
        yield
    except errors.RevisionNotFoundError:
        raise PullError(f"{repo}: no revision {revision!r} (a branch, tag or commit)") from None
    except errors.GatedRepoError:
        raise PullError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise PullError(f"{repo}: no such repository (or private: set HF_TOKEN)") from None
    except errors.RemoteEntryNotFoundError as err:
        raise PullError(f"{where}: a file is missing: {err}") from None
    except errors.HfHubHTTPError as err:
        raise PullError(f"{where}: {str(err).splitlines()[0]}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as err:
        raise PullError(f"{where}: cannot reach the Hub ({_endpoint() or 'huggingface.co'}): "
                        f"{str(err).splitlines()[0]}") from None
    except Exception as err:
        if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests"):
            raise PullError(f"{where}: cannot reach the Hub ({_endpoint() or 'huggingface.co'}): "
                            f"{err}") from None
        raise


def _check_disk(needs: dict[str, int]) -> None:
    """``needs``: bytes per folder; folders on one file system add up."""
    by_device: dict[int, tuple[str, int]] = {}
    for folder, n in needs.items():
        existing = Path(folder)
        while not existing.exists():
            existing = existing.parent
        dev = existing.stat().st_dev
        prev = by_device.get(dev, (str(existing), 0))
        by_device[dev] = (prev[0], prev[1] + n)
    for where, n in by_device.values():
        free = shutil.disk_usage(where).free
        if free < n + DISK_MARGIN:
            raise PullError(f"not enough disk space in {where}: the pull needs about "
                            f"{(n + DISK_MARGIN) / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def _gguf_bytes(checkpoint_bytes: int, qtype: str) -> int:
    """About the size of a ``qtype`` GGUF of a 16-bit checkpoint of ``checkpoint_bytes``:
    bits per weight of the type's main tensor type, plus 15% for the tensors kept wider."""
    import gguf

    from ._native import _core

    main = {name: t for name, _, t in _core.quantize_ftypes()}[qtype]  # "Q4_K_M" -> "q4_K"
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[main.upper()]]
    return int(checkpoint_bytes * (8 * nbytes / block) / 16 * 1.15)


def _pick_gguf(ggufs: list[str], pattern: str, where: str) -> str:
    hits = [f for f in ggufs if fnmatch.fnmatch(f, pattern) or fnmatch.fnmatch(os.path.basename(f), pattern)]
    if len(hits) == 1:
        return hits[0]
    listing = ", ".join(ggufs) or "none"
    if not hits:
        raise PullError(f"{where}: no GGUF file matches {pattern!r} (GGUF files: {listing})")
    raise PullError(f"{where}: {pattern!r} matches {len(hits)} files, pick one: {', '.join(hits)}")


def _gguf_tag(path: Path, fallback: str) -> tuple[str, str]:
    """(tag, type name) of a downloaded GGUF, from its ``general.file_type``; checks that it
    is a phi4flash model."""
    from ._native import _core
    from .engine import ARCH
    from .gguf_metadata import read_metadata

    meta = read_metadata(path)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise PullError(f"{fallback}: not a {ARCH} GGUF (architecture {arch!r})")
    ftype = meta.get("general.file_type")
    for name, code, _ in _core.quantize_ftypes():
        if ftype is not None and int(ftype) == code:
            return name.lower(), name
    stem = re.sub(r"[^a-z0-9._-]+", "-", Path(fallback).stem.lower()).strip("-._") or "gguf"
    return stem, f"file_type {ftype}"


def _choose_files(files: dict[str, Optional[int]], quant: str, file: Optional[str],
                  where: str) -> tuple[list[str], bool]:
    """(the files to download, whether that is one GGUF file) of a repository's ``files``."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if file is None and not any(f.endswith(".safetensors") for f in files):
        # a repository of GGUF files: like llama.cpp's -hf REPO:QUANT, take the one file named
        # after the quant type
        named = [f for f in ggufs if quant.lower() in os.path.basename(f).lower()]
        if len(named) != 1:
            hint = (f"; it has GGUF files, pick one with --file (e.g. --file '{ggufs[0]}')"
                    if ggufs else "")
            raise PullError(f"{where}: no *.safetensors checkpoint{hint}")
        file = named[0]
    if file is not None:
        return [_pick_gguf(ggufs, file, where)], True
    # the small files first: a broken config or tokenizer shows before the big downloads
    wanted = sorted((f for f in files if any(fnmatch.fnmatch(f, p) for p in CHECKPOINT_PATTERNS)),
                    key=lambda f: (f.endswith(".safetensors"), f))
    if "config.json" not in wanted:
        raise PullError(f"{where}: no config.json")
    return wanted, False


def _space_needed(files: dict[str, Optional[int]], wanted: list[str], cached_before: set[str],
                  qtype: Optional[str], hf_cache: Optional[str]) -> dict[str, int]:
    """Bytes per folder a pull writes: the downloads (the Hugging Face cache) and the model
    being built (sambay's cache); ``qtype`` None for a GGUF taken as is."""
    from huggingface_hub import constants

    download = sum(files.get(f) or 0 for f in wanted if f not in cached_before)
    weights = sum(files.get(f) or 0 for f in wanted if f.endswith((".safetensors", ".gguf")))
    if qtype is None:
        building = weights  # the GGUF itself
    elif qtype.lower() in ("f32", "f16", "bf16"):
        building = _gguf_bytes(weights, qtype)
    else:  # the converted GGUF (the checkpoint's own type) next to the quantized one
        building = weights + _gguf_bytes(weights, qtype)
    return {hf_cache or str(constants.HF_HUB_CACHE): download, str(cache.cache_root()): building}


def pull(repo: str = DEFAULT_REPO, *, quant: str = DEFAULT_QUANT, revision: Optional[str] = None,
         file: Optional[str] = None, name: Optional[str] = None, keep_hf: bool = False,
         progress: bool = True) -> cache.CacheEntry:
    """Download, convert and quantize a model into the cache (or take a GGUF file as is).

    Args:
        repo: a Hugging Face model repository id.
        quant: the cached type, one of :data:`sambay.QUANT_TYPES` (F32/F16/BF16: converted,
            not quantized); ignored with ``file``.
        revision: branch, tag or commit (default: the repository's default branch).
        file: a GGUF file name or pattern (``*Q4_K_M.gguf``) in a repository of GGUF files.
        name: the cache name (default: :func:`default_name`).
        keep_hf: keep the downloaded checkpoint in the Hugging Face cache.
        progress: progress bars on stderr.

    Returns:
        The new cache entry (``entry.path`` is the GGUF file).

    Raises:
        PullError: unknown repository or revision, no safetensors (or no matching GGUF), not
            enough disk space, a failed download, conversion or quantization. Nothing is
            added to the cache then; completed downloads stay in the Hugging Face cache, so a
            rerun resumes.
        MissingDependencyError: huggingface_hub is not installed.
    """
    hf = _hf()
    from .quantization import QUANT_TYPES

    qtype = next((t for t in QUANT_TYPES if t.lower() == quant.lower()), None)
    if file is None and qtype is None:
        raise ValueError(f"quant must be one of {', '.join(QUANT_TYPES)}; got {quant!r}")
    name = cache.check_name(name or default_name(repo), "name")
    endpoint, hf_cache = _endpoint(), _hf_cache_dir()
    where = repo + (f"@{revision}" if revision else "")

    with _hub_errors(repo, revision):
        info = hf.HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    sha = info.sha
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    wanted, is_gguf = _choose_files(files, quant, file, where)
    cached_before = {f for f in wanted if isinstance(
        hf.try_to_load_from_cache(repo, f, cache_dir=hf_cache, revision=sha), str)}
    _check_disk(_space_needed(files, wanted, cached_before, qtype if not is_gguf else None,
                              hf_cache))

    tqdm_class = _tqdm_class(progress)
    local: dict[str, Path] = {}
    with _hub_errors(repo, revision):
        for f in wanted:
            local[f] = Path(hf.hf_hub_download(repo, f, revision=sha, cache_dir=hf_cache,
                                               endpoint=endpoint, tqdm_class=tqdm_class))

    with cache.staging() as stage:
        out = stage / cache.MODEL_FILE
        if is_gguf:
            tag, type_name = _gguf_tag(local[wanted[0]], wanted[0])
            if keep_hf or wanted[0] in cached_before:
                shutil.copyfile(local[wanted[0]], out)
            else:  # the downloaded blob becomes the entry's file (a rename on one file system)
                shutil.move(str(local[wanted[0]].resolve()), str(out))
        else:
            tag, type_name = _build(local["config.json"].parent, stage, qtype or DEFAULT_QUANT,
                                    progress)
        entry = cache.commit(stage, name=name, tag=tag, type_name=type_name, repo=repo,
                             revision=sha or "", hf_file=wanted[0] if is_gguf else None)
    if not keep_hf:
        _forget_downloads([local[f] for f in wanted if f not in cached_before])
    return entry


def _build(hf_dir: Path, stage: Path, qtype: str, progress: bool) -> tuple[str, str]:
    """Convert (and quantize) the checkpoint in ``hf_dir`` into ``stage/model.gguf``."""
    from .convert import ConvertError, convert
    from .quantization import QuantizeError, quantize

    out = stage / cache.MODEL_FILE
    plain = qtype.lower() in ("f32", "f16", "bf16")
    try:
        if plain:
            convert(hf_dir, out, outtype=qtype.lower(), progress=progress)
        else:
            tmp = stage / "converted.gguf"
            convert(hf_dir, tmp, outtype="auto", progress=progress)
            quantize(tmp, out, qtype, progress=progress)
            tmp.unlink()
    except (ConvertError, QuantizeError) as err:
        raise PullError(f"{hf_dir.name}: {err}") from err
    except OSError as err:
        raise PullError(f"cannot write the model into the cache ({stage.parent.parent}): "
                        f"{err.strerror or err}") from err
    return qtype.lower(), qtype


def _forget_downloads(paths: list[Path]) -> None:
    """Delete downloaded files from the Hugging Face cache (the snapshot link and its blob),
    then the repository's folder once nothing is left in it."""
    for p in paths:
        blob = p.resolve()
        with contextlib.suppress(OSError):
            p.unlink()
        if blob != p:
            with contextlib.suppress(OSError):
                blob.unlink()
    for p in paths:  # snapshots/<sha>/[sub/]file: prune empty folders up to the repo folder
        folder = p.parent
        while folder.name != "snapshots" and folder.parent != folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
            folder = folder.parent
        repo_folder = folder.parent
        if folder.name == "snapshots" and folder.is_dir() and not any(folder.iterdir()):
            blobs = repo_folder / "blobs"
            if not blobs.is_dir() or not any(blobs.iterdir()):
                shutil.rmtree(repo_folder, ignore_errors=True)


def ensure(repo: str, *, quant: str = DEFAULT_QUANT, file: Optional[str] = None,
           revision: Optional[str] = None, download: bool = True, progress: bool = True
           ) -> cache.CacheEntry:
    """The cached model pulled from ``repo`` with this quant (or file pattern); pulled now when
    missing and ``download`` is true.

    Raises:
        PullError: not cached and ``download`` is false, or the pull failed.
    """
    entry = cache.find_pulled(repo, tag=quant, hf_file=file, revision=revision)
    if entry is not None:
        return entry
    if not download:
        raise PullError(f"{repo} is not in the cache: sambay pull {repo}")
    log.info("%s is not in the cache, pulling it", repo)
    return pull(repo, quant=quant, file=file, revision=revision, progress=progress)
