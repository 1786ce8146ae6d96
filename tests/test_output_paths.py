"""What ``sambay convert`` and ``sambay quantize`` may write over, and what they leave behind.

Nothing that is not a regular file is replaced (devices, FIFOs: refused), symlinks are
followed, an output that is one of the inputs is refused, an existing regular file is replaced
atomically, and no temporary file survives an error, Ctrl-C, SIGTERM, or (after the next run)
a kill -9.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sambay import QuantizeError, cli, quantize
from sambay._native import _core
from sambay.convert import ConvertError, convert, tiny

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, signals and links are POSIX")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny.write_checkpoint(tmp_path_factory.mktemp("base") / "ck", "tiny-8", seed=5)


@pytest.fixture(scope="module")
def f32_gguf(base, tmp_path_factory) -> Path:
    return convert(base, tmp_path_factory.mktemp("gguf") / "f32.gguf", outtype="f32", progress=False)


@pytest.fixture
def ck(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "ck"))


def _convert(src, out):
    return convert(src, out, progress=False)


def _quantize(src, out):
    return quantize(src, out, "Q8_0", progress=False)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# outputs that are not regular files


@posix_only
@pytest.mark.parametrize("tool", ["convert", "quantize"])
def test_fifo_output_is_refused(tool, base, f32_gguf, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.gguf"
    link.symlink_to(fifo)
    run, src, error = ((_convert, base, ConvertError) if tool == "convert"
                       else (_quantize, f32_gguf, QuantizeError))
    for out in (fifo, link):
        with pytest.raises(error, match="exists and is a FIFO, not a regular file; refusing"):
            run(src, out)
    assert fifo.is_fifo() and link.is_symlink() and link.resolve() == fifo
    assert _hidden(tmp_path) == []


def test_device_output_is_refused(base, f32_gguf):
    # the check runs before anything is written: /dev/null stays a device
    with pytest.raises(ConvertError, match="/dev/null: exists and is a character device"):
        _convert(base, "/dev/null")
    with pytest.raises(QuantizeError, match="/dev/full: exists and is a character device"):
        _quantize(f32_gguf, "/dev/full")
    assert Path("/dev/null").is_char_device() and Path("/dev/full").is_char_device()


@posix_only
def test_cli_refuses_a_fifo(base, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert cli.main(["convert", str(base), str(fifo), "-q"]) == 1
    assert capsys.readouterr().err == (
        f"sambay convert: error: {fifo}: exists and is a FIFO, not a regular file; "
        "refusing to replace it\n")
    assert fifo.is_fifo()


@posix_only
@pytest.mark.parametrize("tool", ["convert", "quantize"])
def test_symlinked_output_is_followed(tool, base, f32_gguf, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "m.gguf"
    real.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(real_dir / "new.gguf")
    run, src = (_convert, base) if tool == "convert" else (_quantize, f32_gguf)
    run(src, link)
    run(src, dangling)
    assert link.is_symlink() and dangling.is_symlink()
    assert real.read_bytes()[:4] == b"GGUF" and (real_dir / "new.gguf").read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in real_dir.iterdir()) == ["m.gguf", "new.gguf"]


# ---------------------------------------------------------------------------------------------
# an output that is an input


def test_convert_refuses_to_write_over_its_input(ck, tmp_path):
    weights = ck / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(ConvertError, match=r"model.safetensors: is the input file .*model.safetensors"):
        _convert(ck, weights)
    with pytest.raises(ConvertError, match="is the input file"):
        _convert(ck, ck / "tokenizer.json")
    if os.name == "posix":
        link = tmp_path / "link.gguf"
        link.symlink_to(weights)
        hard = tmp_path / "hard.gguf"
        os.link(weights, hard)
        for out in (link, hard):
            with pytest.raises(ConvertError, match="is the input file"):
                _convert(ck, out)
    assert weights.read_bytes() == before
    assert _hidden(ck) == []


def test_quantize_refuses_to_write_over_its_input(f32_gguf, tmp_path):
    src = tmp_path / "a.gguf"
    shutil.copyfile(f32_gguf, src)
    before = src.read_bytes()
    with pytest.raises(QuantizeError, match="a.gguf: is the input file"):
        _quantize(src, src)
    with pytest.raises(QuantizeError, match="is the input file"):
        _quantize(src, tmp_path / "." / "a.gguf")
    if os.name == "posix":
        hard = tmp_path / "hard.gguf"
        os.link(src, hard)
        with pytest.raises(QuantizeError, match="is the input file"):
            _quantize(src, hard)
    assert src.read_bytes() == before


def test_quantize_cli_same_file(f32_gguf, tmp_path, capsys):
    src = tmp_path / "a.gguf"
    shutil.copyfile(f32_gguf, src)
    assert cli.main(["quantize", str(src), str(src), "Q8_0", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sambay quantize: error: ") and "is the input file" in err
    assert src.read_bytes() == f32_gguf.read_bytes()


def test_existing_regular_output_is_replaced(f32_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    out.write_bytes(b"an older quantization")
    _quantize(f32_gguf, out)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


# ---------------------------------------------------------------------------------------------
# interrupted runs

# the child reaches its first tensor, says "ready" and waits to be killed
_SLOW_CONVERT = """
    import sys, time
    from sambay.convert import convert, pipeline
    real = pipeline.iter_rows  # called while writing the big matrices
    def slow(*args):
        print("ready", flush=True); time.sleep(60); return real(*args)
    pipeline.iter_rows = slow
    convert(sys.argv[1], sys.argv[2], progress=False)
"""
_SLOW_QUANTIZE = """
    import sys, time
    import sambay.quantization as sq
    real = sq._core.quantize_file
    def slowed(*args, progress=None, **kw):
        def slow(i, n, name, type_name):
            if progress is not None:
                progress(i, n, name, type_name)
            print("ready", flush=True); time.sleep(60)
        return real(*args, progress=slow, **kw)
    sq._core.quantize_file = slowed
    sq.quantize(sys.argv[1], sys.argv[2], "Q8_0", progress=False)
"""


@posix_only
@pytest.mark.parametrize("tool", ["convert", "quantize"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_removes_the_temporary_file(tool, signum, base, f32_gguf, tmp_path):
    if signal.getsignal(signum) is signal.SIG_IGN:  # e.g. under nohup: the child ignores it too
        pytest.skip(f"{signum.name} is ignored in this session")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    code, src = (_SLOW_CONVERT, base) if tool == "convert" else (_SLOW_QUANTIZE, f32_gguf)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(src), str(out)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert len(_hidden(out.parent)) == 1  # the temporary file is there
        child.send_signal(signum)
        assert child.wait(timeout=60) == -signum  # ended by the signal, as without sambay
    finally:
        child.kill()
        child.wait()
    assert _hidden(out.parent) == []
    assert out.read_bytes() == b"previous"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@posix_only
@pytest.mark.parametrize("tool", ["convert", "quantize"])
def test_stale_temporary_files_are_swept(tool, base, f32_gguf, tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".m.gguf.{dead}.tmp", tmp_path / f".other.gguf.{dead}.tmp",
             tmp_path / f".empty.gguf.{dead}.tmp"]
    stale[0].write_bytes(b"GGUF" + b"\0" * 100)
    stale[1].write_bytes(b"GGUF" + b"\0" * 100)
    stale[2].write_bytes(b"")
    keep = [tmp_path / f".live.gguf.{os.getppid()}.tmp",  # a writer still running
            tmp_path / f".notes.txt.{dead}.tmp",  # not ours: not a GGUF
            tmp_path / ".m.gguf.tmp"]  # no pid
    keep[0].write_bytes(b"GGUF")
    keep[1].write_bytes(b"my notes")
    keep[2].write_bytes(b"GGUF")
    run, src = (_convert, base) if tool == "convert" else (_quantize, f32_gguf)
    run(src, tmp_path / "m.gguf")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


# ---------------------------------------------------------------------------------------------
# a full disk


def test_quantize_full_disk_names_the_reason(f32_gguf):
    # the engine writes where it is told: /dev/full fails every write with ENOSPC
    with pytest.raises(QuantizeError, match="^cannot write the output file: No space left on device$"):
        _core.quantize_file(str(f32_gguf), "/dev/full", "Q8_0")


@posix_only
def test_quantize_file_size_limit_names_the_reason(f32_gguf, tmp_path):
    # a write refused by the system (here RLIMIT_FSIZE) is reported with its reason
    code = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from sambay import cli
        sys.exit(cli.main(["quantize", sys.argv[1], sys.argv[2], "Q8_0", "-q"]))
    """)
    out = tmp_path / "q.gguf"
    run = subprocess.run([sys.executable, "-c", code, str(f32_gguf), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr == "sambay quantize: error: cannot write the output file: File too large\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("tool", ["convert", "quantize"])
def test_unwritable_folder_names_the_output(tool, base, f32_gguf, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere, except in sysfs
        if not Path("/sys/kernel").is_dir():
            pytest.skip("running as root without sysfs")
        folder = Path("/sys")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    run, src, error = ((_convert, base, ConvertError) if tool == "convert"
                       else (_quantize, f32_gguf, QuantizeError))
    try:
        with pytest.raises(error, match=f"^{folder / 'm.gguf'}: cannot write: Permission denied$"):
            run(src, folder / "m.gguf")
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o755)
