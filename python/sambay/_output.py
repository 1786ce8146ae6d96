"""Writing an output file without losing anything (``sambay convert`` and ``sambay quantize``).

The rules, in one place:

- the output path is followed through symlinks: the file they point at is the one replaced,
  the links stay;
- an output that exists and is not a regular file (a folder, a device such as ``/dev/null``, a
  FIFO, a socket) is refused: replacing it would destroy something that is not a model file;
- an output that is one of the inputs (the same file: same device and inode, also through
  symlinks or hard links) is refused: the input would be gone before it was read;
- an existing regular file is replaced, as llama.cpp's ``convert_hf_to_gguf.py`` and
  ``llama-quantize`` do, but atomically: the data goes to ``.NAME.PID.tmp`` next to it,
  is fsynced and renamed over it, so an interrupted run leaves the old file as it was;
- the temporary file is removed on any error, on Ctrl-C and on SIGTERM/SIGHUP; one left by
  a process that was killed outright (``kill -9``, power loss) is removed by the next run that
  writes into the same folder, once its process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

_log = logging.getLogger("sambay")

# .NAME.PID.tmp; only files that also start like a GGUF (or are still empty) are swept
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")
_GGUF_MAGIC = b"GGUF"

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def resolve_output(
    path: PathLike, inputs: Iterable[PathLike], error: Callable[[str], Exception]
) -> Path:
    """The file to write for the output ``path``, after checking it may be replaced.

    Args:
        path: the output path as the user gave it (symlinks are followed).
        inputs: the files the command reads; the output may not be one of them.
        error: the exception type to raise (``ConvertError``, ``QuantizeError``).

    Returns:
        The real path of the output (symlinks resolved); its folder exists.

    Raises:
        ``error``: the output is a folder, exists but is not a regular file, is one of the
        inputs, or its folder does not exist.
    """
    given = Path(path)
    target = Path(os.path.realpath(given))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as err:  # a symlink loop, a path through a file, no permission
        raise error(f"{given}: cannot use as the output: {err.strerror or err}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{given}: is a folder; give the output file's path")
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise error(f"{given}: exists and is {kind}, not a regular file; refusing to replace it")
        for src in inputs:
            try:
                if os.path.samestat(os.stat(src), st):
                    raise error(f"{given}: is the input file {src}; write the output to another path")
            except OSError:
                continue  # an input that does not exist cannot be the output
    if not target.parent.is_dir():
        raise error(f"{given.parent}: output folder does not exist")
    return target


@contextlib.contextmanager
def atomic_output(target: Path, error: Callable[[str], Exception]) -> Iterator[Path]:
    """Yields a temporary path next to ``target`` for the body to write; on success the file
    is fsynced and renamed over ``target``, on any failure (SIGTERM and SIGHUP included) it is
    removed. ``target`` comes from :func:`resolve_output`.

    Raises:
        ``error``: an OSError while finishing the file (e.g. "No space left on device").
    """
    sweep_stale_temps(target.parent)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with _terminate_raises():
        try:
            # created here, so that an unwritable folder is reported with the output's name
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, target)
        except BaseException as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(err, OSError):
                raise error(f"{target}: cannot write: {err.strerror or err}") from None
            raise
    _fsync_dir(target.parent)


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Removes the temporary files in ``folder`` that a killed writer left (``.NAME.PID.tmp``,
    a GGUF or empty, whose process is gone). Returns what it removed."""
    removed: list[Path] = []
    if os.name != "posix":  # no cheap, harmless "is this process alive" elsewhere
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _process_alive(pid) or not _looks_like_our_temp(entry.path):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
            _log.info("removed %s, left by an interrupted run (process %d)", entry.path, pid)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but belongs to someone else
    return True


def _looks_like_our_temp(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_GGUF_MAGIC))
    except OSError:
        return False
    return head in (b"", _GGUF_MAGIC)


class _Terminated(BaseException):
    """SIGTERM/SIGHUP arrived while an output was being written (unwinds to the cleanup)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """While the body runs, SIGTERM and SIGHUP raise _Terminated (where their action is the
    default: end the process), so the cleanup runs; then the signal is delivered again with
    its default action, and the process ends as it would have."""
    names = ("SIGTERM", "SIGHUP")
    signums = [getattr(signal, n) for n in names if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return
    installed = {}

    def raise_terminated(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    for signum in signums:
        if signal.getsignal(signum) is signal.SIG_DFL:
            installed[signum] = signal.signal(signum, raise_terminated)
    try:
        yield
    except _Terminated as t:
        for signum, previous in installed.items():
            signal.signal(signum, previous)
        installed.clear()
        os.kill(os.getpid(), t.signum)
        raise  # not reached where the default action ends the process
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows cannot flush a read-only descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the data itself is already synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
