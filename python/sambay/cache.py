"""sambay's model cache: pulled GGUF files by name (``phi4-flash:q4_k_m``), no network here.

Layout under :func:`cache_root` (``$SAMBAY_HOME``, else the platform's cache folder)::

    models/<name>/<tag>/model.gguf          the model
    models/<name>/<tag>/entry.json          name, tag, type, size, repo, revision, date
    staging/<pid>-<random>/                 a pull in progress (never listed)

An entry appears in one ``os.replace`` of a finished staging folder, so an interrupted pull
leaves no half entry; staging folders of processes that no longer run are removed by the
next :func:`staging`. :mod:`sambay.hub` fills the cache; this module finds, lists and removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import PullError

ENTRY_FILE = "entry.json"
MODEL_FILE = "model.gguf"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def cache_root() -> Path:
    """``$SAMBAY_HOME``, else ``$XDG_CACHE_HOME/sambay`` or ``~/.cache/sambay`` (Linux),
    ``~/Library/Caches/sambay`` (macOS), ``%LOCALAPPDATA%\\sambay\\Cache`` (Windows)."""
    home = os.environ.get("SAMBAY_HOME")
    if home:
        return Path(home).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "sambay" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sambay"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sambay"


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cached model.

    Attributes:
        name: the model's name (``phi4-flash``).
        tag: its variant, the quantization type in lower case (``q4_k_m``).
        type: the tensor type name (``Q4_K_M``), or the GGUF file type for a pulled GGUF.
        size: bytes of the GGUF file.
        repo: the Hugging Face repository it came from.
        revision: the commit it came from.
        created: ISO 8601 time of the pull (UTC).
        hf_file: for a pulled GGUF, its file name in the repository; None when converted.
        path: the GGUF file.
    """

    name: str
    tag: str
    type: str
    size: int
    repo: str
    revision: str
    created: str
    hf_file: Optional[str]
    path: Path

    @property
    def ref(self) -> str:
        """``name:tag``, what ``-m`` and ``sambay rm`` accept."""
        return f"{self.name}:{self.tag}"


def check_name(value: str, what: str) -> str:
    """``value`` if it is a valid cache name or tag (lower case letters, digits, ``._-``)."""
    if not _NAME_RE.match(value):
        raise ValueError(f"{what} must be lower-case letters, digits, '.', '_' or '-'; got {value!r}")
    return value


def _read_entry(folder: Path) -> Optional[CacheEntry]:
    try:
        data = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
        return CacheEntry(
            name=str(data["name"]), tag=str(data["tag"]), type=str(data["type"]),
            size=int(data["size"]), repo=str(data["repo"]), revision=str(data["revision"]),
            created=str(data["created"]), hf_file=data.get("hf_file"), path=folder / MODEL_FILE)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an entry (or a damaged one): never offered as a model


def list_entries(root: Optional[Path] = None) -> list[CacheEntry]:
    """Every complete entry, sorted by ``name:tag``."""
    models = (root or cache_root()) / "models"
    if not models.is_dir():
        return []
    found = []
    for folder in sorted(models.glob("*/*")):
        if folder.name.startswith("."):
            continue  # an entry being replaced or removed
        entry = _read_entry(folder)
        if entry is not None and entry.path.is_file():
            found.append(entry)
    return found


def find_entry(ref: str, root: Optional[Path] = None) -> Optional[CacheEntry]:
    """The entry called ``name:tag``, or ``name`` alone when that name has exactly one tag.

    Raises:
        ValueError: ``name`` alone matches several tags (they are listed).
    """
    name, _, tag = ref.partition(":")
    matches = [e for e in list_entries(root) if e.name == name.lower()
               and (not tag or e.tag == tag.lower())]
    if len(matches) > 1:
        raise ValueError(f"{name} has several variants, give one of: "
                         + ", ".join(e.ref for e in matches))
    return matches[0] if matches else None


def find_pulled(repo: str, *, tag: Optional[str] = None, hf_file: Optional[str] = None,
                revision: Optional[str] = None, root: Optional[Path] = None) -> Optional[CacheEntry]:
    """The newest entry pulled from ``repo`` with this tag, or whose GGUF file in the
    repository matches the pattern ``hf_file``; ``revision`` a commit prefix (None: any)."""
    import fnmatch

    def fits(e: CacheEntry) -> bool:
        if e.repo.lower() != repo.lower():
            return False
        if revision is not None and not e.revision.startswith(revision):
            return False
        if hf_file is not None:
            return e.hf_file is not None and fnmatch.fnmatch(e.hf_file, hf_file)
        return tag is None or e.tag == tag.lower()

    matches = sorted((e for e in list_entries(root) if fits(e)), key=lambda e: e.created)
    return matches[-1] if matches else None


def remove_entry(ref: str, root: Optional[Path] = None) -> CacheEntry:
    """Delete the entry ``name:tag`` (or ``name`` with one tag) and return what it was.

    Raises:
        PullError: no such entry.
    """
    entry = find_entry(ref, root)
    if entry is None:
        raise PullError(f"no cached model {ref!r} (`sambay list` shows the cache)")
    folder = entry.path.parent
    # rename first: a crash halfway through the delete leaves no entry that looks complete
    trash = folder.with_name(f".{folder.name}.removing-{uuid.uuid4().hex[:8]}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # the name's folder, once its last tag is gone
    return entry


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours
    return True


@contextlib.contextmanager
def staging(root: Optional[Path] = None) -> Iterator[Path]:
    """A private folder for a pull in progress on the cache's file system; removed on exit
    whatever happens (a committed entry has already been moved out of it)."""
    base = (root or cache_root()) / "staging"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():  # left by a killed pull
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = base / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def commit(stage: Path, *, name: str, tag: str, type_name: str, repo: str, revision: str,
           hf_file: Optional[str] = None, root: Optional[Path] = None) -> CacheEntry:
    """Turn ``stage`` (holding :data:`MODEL_FILE`) into the entry ``name:tag`` in one rename,
    replacing an older entry of the same name and tag."""
    check_name(name, "name")
    check_name(tag, "tag")
    model = stage / MODEL_FILE
    record: dict[str, Any] = {
        "name": name, "tag": tag, "type": type_name, "size": model.stat().st_size, "repo": repo,
        "revision": revision, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hf_file": hf_file}
    (stage / ENTRY_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    final = (root or cache_root()) / "models" / name / tag
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{tag}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(stage, final)  # the staging folder itself becomes the entry
    entry = _read_entry(final)
    assert entry is not None
    return entry


def looks_like_repo_id(spec: str) -> bool:
    """``owner/name`` (optionally ``:TAG``), the shape of a Hugging Face model id."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?", spec) is not None


def resolve_model(spec: str, *, pull: bool = True, progress: bool = True) -> str:
    """What ``-m`` means: a file (``*.gguf`` or a path), a cache name (``phi4-flash:q4_k_m``), or a Hugging
    Face repository id ``owner/name[:QUANT]`` (from the cache when pulled before, else pulled
    now when ``pull`` is true).

    Raises:
        FileNotFoundError: not a path and none of the others.
        PullError: the pull failed.
    """
    if os.path.exists(spec) or spec.lower().endswith(".gguf") or (
            ("/" in spec or os.sep in spec) and not looks_like_repo_id(spec)):
        return spec  # a path: a missing file is reported by whoever opens it
    if "/" not in spec:
        entry = find_entry(spec)
        if entry is not None:
            return str(entry.path)
    if looks_like_repo_id(spec):
        from .hub import DEFAULT_QUANT, ensure

        repo, _, quant = spec.partition(":")
        return str(ensure(repo, quant=quant or DEFAULT_QUANT, download=pull,
                          progress=progress).path)
    raise FileNotFoundError(
        f"{spec}: no such file, cached model (`sambay list`) or Hugging Face repository id")
