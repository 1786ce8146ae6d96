"""The installed package: version, the ggml it runs on, the CLI entry point."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sambay
import sambay._native


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sambay", *args], capture_output=True, text=True, timeout=120
    )


def test_version_matches_metadata():
    assert sambay.__version__ == importlib.metadata.version("sambay")
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"sambay {sambay.__version__}"


def test_runtime_ggml_is_the_pinned_one():
    # the extension must run against the exact ggml it was built with (ssm_scan's signature
    # changes between releases while the SONAME stays libggml*.so.0)
    pins = [
        r for r in importlib.metadata.requires("sambay") or [] if r.startswith("libggml-python")
    ]
    assert pins == ["libggml-python==0.20.2.post1"]
    assert importlib.metadata.version("libggml-python") == "0.20.2.post1"
    info = sambay.system_info()
    assert info["ggml_version"] == "0.20.2"


def test_requires_python_is_the_pinned_ggmls():
    # libggml-python 0.20.2.post1 has wheels for CPython 3.10-3.14 only: sambay must not
    # promise a Python it cannot be installed on
    ours = importlib.metadata.metadata("sambay")["Requires-Python"]
    assert ours == importlib.metadata.metadata("libggml-python")["Requires-Python"] == ">=3.10"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks an ELF rpath (Linux)")
@pytest.mark.parametrize("libdir", ["lib64", "lib"])
def test_extension_finds_ggml_in_either_install_folder(tmp_path, libdir):
    """The wheels install ggml into libggml/lib64, a source build of libggml-python into
    libggml/lib: the extension's own rpath finds either, without _native.py's preload."""
    import libggml

    core = Path(sambay._native._core.__file__)
    found = Path(libggml.__file__).parent
    libs = next(found / d for d in ("lib64", "lib") if (found / d).is_dir())
    (tmp_path / "sambay").mkdir()
    shutil.copy(core, tmp_path / "sambay" / core.name)
    (tmp_path / "libggml" / libdir).mkdir(parents=True)
    for f in libs.glob("*.so*"):
        shutil.copy(f, tmp_path / "libggml" / libdir / f.name)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    code = f"import ctypes; ctypes.CDLL({str(tmp_path / 'sambay' / core.name)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_system_info_reports_cpu_backend_and_features():
    info = sambay.system_info()
    assert info["sambay_version"] == sambay.__version__
    names = [b["name"] for b in info["backends"]]
    assert "CPU" in names
    cpu_devices = [d for d in info["devices"] if d["type"] == "cpu"]
    assert cpu_devices and cpu_devices[0]["memory_total"] > 0
    if platform.machine().lower() in ("x86_64", "amd64"):
        # the PyPI x86-64 wheels of libggml are built for AVX2/FMA/F16C
        assert {"AVX2", "FMA", "F16C"} <= set(info["cpu_features"])
    assert all(isinstance(f, str) and f for f in info["cpu_features"])


def test_cli_system_info():
    out = _run("system-info")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^sambay \S+$", out.stdout, re.M)
    assert re.search(r"^ggml 0\.20\.2 \(commit \w+\)$", out.stdout, re.M)
    assert "CPU features:" in out.stdout
    assert re.search(r"^  CPU \[cpu\]", out.stdout, re.M)


def test_system_info_reports_the_huge_page_mode(tmp_path):
    from sambay._system import THP_ENABLED, format_system_info, thp_mode

    f = tmp_path / "enabled"
    for text, want in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                       ("always madvise [never]\n", "never"), ("garbled\n", None)):
        f.write_text(text)
        assert thp_mode(f) == want
    assert thp_mode(tmp_path / "missing") is None
    info = sambay.system_info()
    assert info["huge_pages"] == thp_mode(THP_ENABLED)
    lines = format_system_info({**info, "huge_pages": "madvise"}).splitlines()
    assert "transparent huge pages: madvise (sambay asks for them for the weights it copies and its caches)" in lines
    assert not any("huge pages" in line for line in format_system_info({**info, "huge_pages": None}).splitlines())


def test_cli_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("convert", "system-info"):
        assert cmd in out.stdout
