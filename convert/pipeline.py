"""convert(): HF checkpoint folder -> one GGUF file, validated up front, written atomically."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from gguf import GGMLQuantizationType

from . import transforms
from .._output import atomic_output, resolve_output
from .errors import ConvertError, ConvertWarning
from .hparams import SambayHParams, load_hparams
from .metadata import ARCH, general_metadata, model_kvs
from .safetensors_reader import FLOAT_DTYPES, TensorEntry, iter_rows, open_checkpoint, read_tensor
from .schedule import LayerKind
from .tensor_map import LM_HEAD, PlannedTensor, Store, Transform, apply, plan
from .vocab import load_vocab
from .writer import TensorOut, write_gguf

OUTTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
}
_SOURCE_TYPES = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
}
CHUNK_BYTES = 32 * 1024 * 1024  # source bytes per chunk when streaming a big matrix


def _read_json(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path.parent}: no {path.name}")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConvertError(f"{path.name}: cannot parse: {err}") from None


def _check_tensors(
    planned: list[PlannedTensor], entries: dict[str, TensorEntry], h: SambayHParams
) -> None:
    """Every problem with the tensor set, reported at once (missing, unexpected, shape, dtype)."""
    want = {t.hf_name: t for t in planned}
    missing = [n for n in want if n not in entries]
    if not h.tie_word_embeddings and LM_HEAD not in entries:
        missing.append(
            LM_HEAD
        )  # untied config: the output matrix must be there (and equal the embedding)
    extra = sorted(n for n in entries if n not in want and n != LM_HEAD)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra)}")
    if problems:
        raise ConvertError("; ".join(problems))

    bad_shape = [
        f"{n} expected {list(t.hf_shape)} found {list(entries[n].shape)}"
        for n, t in want.items()
        if entries[n].shape != t.hf_shape
    ]
    if LM_HEAD in entries and entries[LM_HEAD].shape != want["model.embed_tokens.weight"].hf_shape:
        bad_shape.append(
            f"{LM_HEAD} expected {list(want['model.embed_tokens.weight'].hf_shape)} found {list(entries[LM_HEAD].shape)}"
        )
    if bad_shape:
        raise ConvertError(f"shape mismatch: {'; '.join(bad_shape)}")
    bad_dtype = [f"{n} ({e.dtype})" for n, e in entries.items() if e.dtype not in FLOAT_DTYPES]
    if bad_dtype:
        raise ConvertError(f"unsupported dtype (F32, F16, BF16 only): {', '.join(bad_dtype)}")


def _resolve_outtype(
    outtype: str, planned: list[PlannedTensor], entries: dict[str, TensorEntry]
) -> GGMLQuantizationType:
    if outtype != "auto":
        return OUTTYPES[outtype]
    # the big matrices' own type; a mix (none in practice) goes to f32, which holds them all
    found = {entries[t.hf_name].dtype for t in planned if t.store == Store.OUTTYPE}
    return _SOURCE_TYPES[found.pop()] if len(found) == 1 else GGMLQuantizationType.F32


def _as_f32(entry: TensorEntry) -> np.ndarray:
    return transforms.cast(read_tensor(entry), entry.dtype, GGMLQuantizationType.F32)


def _fold_lambdas(
    h: SambayHParams, entries: dict[str, TensorEntry]
) -> tuple[list[float], list[float]]:
    """phi4flash.attention.diff_lambda and diff_lambda_init: per layer, 0 where no attention."""
    lam, lam_init = [0.0] * h.n_layer, [0.0] * h.n_layer
    for il, kind in enumerate(h.layer_kinds):
        if kind in (LayerKind.MAMBA, LayerKind.GMU):
            continue
        p = f"model.layers.{il}.attn.inner_cross_attn.lambda_"
        q1, k1, q2, k2 = (_as_f32(entries[p + v]) for v in ("q1", "k1", "q2", "k2"))
        lam[il] = transforms.fold_lambda(q1, k1, q2, k2, il)
        lam_init[il] = transforms.lambda_init(il)
    return lam, lam_init


def _check_lm_head(entries: dict[str, TensorEntry]) -> None:
    """A present lm_head.weight must equal the embedding (compared as f32, in row blocks)."""
    head, embd = entries.get(LM_HEAD), entries["model.embed_tokens.weight"]
    if head is None:
        return
    f32 = GGMLQuantizationType.F32
    row_block = max(1, CHUNK_BYTES // max(1, 4 * int(np.prod(embd.shape[1:]))))
    row = 0
    for a, b in zip(_row_blocks(head, row_block), _row_blocks(embd, row_block)):
        if not np.array_equal(
            transforms.cast(a, head.dtype, f32), transforms.cast(b, embd.dtype, f32), equal_nan=True
        ):
            raise ConvertError(
                f"{LM_HEAD} differs from model.embed_tokens.weight (rows {row}..{row + len(a) - 1}): "
                "untied output embeddings are not supported"
            )
        row += len(a)


def _row_blocks(entry: TensorEntry, rows: int) -> Iterator[np.ndarray]:
    """Blocks of exactly ``rows`` rows (the last may be shorter), whatever the dtype."""
    row_bytes = int(np.prod(entry.shape[1:])) * FLOAT_DTYPES[entry.dtype].itemsize
    return iter_rows(entry, rows * row_bytes)


class _ValueCheck:
    """NaN and Inf in the data as it streams out, per tensor: from the checkpoint itself, or
    finite values the output type cannot hold (F16 beyond +-65504). Warns once the file is
    written, or (strict) refuses at the first such tensor. One pass of isfinite per chunk;
    the checkpoint is looked at again only for a chunk that has some."""

    MAX_LISTED = 10

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.found: dict[str, list[int]] = {}  # "hf (gguf)" -> [nan, inf, overflow, is_f16]

    def __call__(
        self, t: PlannedTensor, src: np.ndarray, src_dtype: str, out: np.ndarray,
        gtype: GGMLQuantizationType,
    ) -> None:
        n_bad = transforms.count_nonfinite(out, gtype)
        if n_bad == 0:
            return
        f32 = transforms.cast(src, src_dtype, GGMLQuantizationType.F32)
        nan, inf = int(np.count_nonzero(np.isnan(f32))), int(np.count_nonzero(np.isinf(f32)))
        key = f"{t.hf_name} ({t.gguf_name})"
        counts = self.found.setdefault(key, [0, 0, 0, int(gtype == GGMLQuantizationType.F16)])
        counts[0] += nan
        counts[1] += inf
        counts[2] += max(0, n_bad - nan - inf)
        if self.strict:
            raise ConvertError(f"{self._describe(key)}; refusing to convert (strict)")

    def _describe(self, key: str) -> str:
        nan, inf, overflow, f16 = self.found[key]
        parts = []
        if nan or inf:
            parts.append(f"{nan} NaN and {inf} Inf value(s) in the checkpoint")
        if overflow:
            parts.append(
                f"{overflow} value(s) beyond F16's range (|x| > 65504) written as Inf "
                "(--outtype bf16 or f32 holds them)" if f16 else
                f"{overflow} value(s) that became Inf or NaN in the conversion"
            )
        return f"{key}: {', '.join(parts)}"

    def warn(self) -> None:
        if not self.found:
            return
        keys = list(self.found)
        for key in keys[: self.MAX_LISTED]:
            warnings.warn(self._describe(key), ConvertWarning, stacklevel=3)
        more = f" (the first {self.MAX_LISTED} listed)" if len(keys) > self.MAX_LISTED else ""
        warnings.warn(
            f"{len(keys)} tensor(s) hold NaN or Inf{more}: the model will likely produce garbage; "
            "strict conversion (--strict) refuses such a checkpoint",
            ConvertWarning, stacklevel=3,
        )


def _tensor_out(
    t: PlannedTensor, e: TensorEntry, gtype: GGMLQuantizationType, h: SambayHParams,
    check: _ValueCheck,
) -> TensorOut:
    assert t.gguf_name is not None
    if t.transform == Transform.NONE and len(t.hf_shape) >= 2:

        def chunks() -> Iterator[np.ndarray]:  # big matrices stream in row chunks
            for part in iter_rows(e, CHUNK_BYTES):
                out = transforms.cast(part, e.dtype, gtype)
                check(t, part, e.dtype, out, gtype)
                yield out
    else:

        def chunks() -> Iterator[np.ndarray]:
            part = read_tensor(e)
            out = apply(t, transforms.cast(part, e.dtype, gtype), h)
            check(t, part, e.dtype, out, gtype)
            yield out

    return TensorOut(t.gguf_name, t.gguf_shape, gtype, chunks)


def convert(
    hf_dir: Union[str, os.PathLike[str]],
    out_path: Union[str, os.PathLike[str]],
    *,
    outtype: str = "auto",
    allow_missing_tokenizer: bool = False,
    progress: bool = True,
    strict: bool = False,
    repo_id: Optional[str] = None,
) -> Path:
    """Convert a Phi-4-mini-flash (SambaY) Hugging Face checkpoint folder to one GGUF file.

    Layout: docs/gguf-format.md. Tensors stream one at a time (big matrices in row chunks),
    so peak memory stays near one chunk plus the tokenizer, whatever the model size.

    Args:
        hf_dir: folder with config.json, *.safetensors (one file, or shards + index) and the
            tokenizer files (tokenizer.json, or vocab.json + merges.txt).
        out_path: the GGUF file to write: created, or replaced atomically if it is a regular
            file (symlinks are followed); never one of the inputs, never a folder, device or
            FIFO. Its folder must exist.
        outtype: type of the big matrices: "f32", "f16", "bf16", or "auto" (the checkpoint's).
            Norms, biases, A, D, conv and sub-norm weights are always F32.
        allow_missing_tokenizer: write a GGUF without tokenizer keys when no tokenizer files
            exist, instead of failing.
        progress: show a tqdm bar over the tensors.
        strict: refuse (ConvertError) a checkpoint with NaN or Inf weights, or with values the
            output type cannot hold (F16 beyond +-65504), instead of warning.
        repo_id: the hub repository the folder came from (``owner/name``): it names the
            model in ``general.*`` and is recorded as ``general.source.repo_url``.

    Returns:
        The output path.

    Raises:
        ConvertError: on any bad input (one-line reason); no output file is left behind.

    Warns:
        ConvertWarning: one per tensor (the first ten) that holds NaN/Inf in the checkpoint or
            overflows the output type, then a summary; the file is written all the same.
    """
    src, out = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES and outtype != "auto":
        raise ConvertError(f"outtype must be one of f32, f16, bf16, auto; got {outtype!r}")
    if not src.exists():
        raise ConvertError(f"{src}: no such folder")
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder")
    # every file in the folder may be read (shards, index, tokenizer, configs)
    target = resolve_output(out, sorted(src.iterdir()), ConvertError)

    config = _read_json(src / "config.json", required=True)
    tok_cfg = _read_json(src / "tokenizer_config.json", required=False)
    if not isinstance(tok_cfg, dict):
        raise ConvertError("tokenizer_config.json: not a JSON object")
    h = load_hparams(config, model_max_length=tok_cfg.get("model_max_length"))
    entries = open_checkpoint(src)
    planned = plan(h)
    _check_tensors(planned, entries, h)
    gtype = _resolve_outtype(outtype, planned, entries)
    vocab = load_vocab(
        src,
        n_vocab=h.n_vocab,
        tok_cfg=tok_cfg,
        config=config,
        allow_missing=allow_missing_tokenizer,
    )
    diff_lambda, diff_lambda_init = _fold_lambdas(h, entries)
    _check_lm_head(entries)

    kvs = model_kvs(
        h,
        outtype=gtype,
        diff_lambda=diff_lambda,
        diff_lambda_init=diff_lambda_init,
    )
    if vocab is not None:
        kvs += vocab.kvs()
    check = _ValueCheck(strict)
    tensors = [
        _tensor_out(
            t,
            entries[t.hf_name],
            gtype if t.store == Store.OUTTYPE else GGMLQuantizationType.F32,
            h,
            check,
        )
        for t in planned
        if t.gguf_name is not None
    ]
    metadata = general_metadata(src, total_params=sum(math.prod(t.shape) for t in tensors),
                                repo_id=repo_id)

    with atomic_output(target, ConvertError) as tmp:
        write_gguf(tmp, ARCH, kvs, tensors, metadata=metadata, progress=progress)
    check.warn()

    return out
