"""scripts/build-ggml.sh, without building: the pip commands it runs, through a stand-in Python
that records ``-m ...`` calls and runs everything else (its pyproject parsing) for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build-ggml.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32",
                                reason="a bash script")


def _pin() -> str:
    import importlib.metadata

    return "libggml-python==" + importlib.metadata.version("libggml-python")


def _run(tmp_path, *args, defines=None):
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-m" ]; then echo "CALL $*"; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))
    env.pop("SAMBAY_GGML_DEFINES", None)
    if defines is not None:
        env["SAMBAY_GGML_DEFINES"] = defines
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                         timeout=60)
    calls = [line[len("CALL "):].split() for line in out.stdout.splitlines() if line.startswith("CALL ")]
    return out, calls


def test_native_build_of_the_pinned_ggml_then_sambay_against_it(tmp_path):
    out, calls = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    ggml, build_reqs, sambay, info = calls
    assert ggml[-1] == _pin()  # the very version sambay is built and run with
    assert "--no-binary" in ggml and "--no-cache-dir" in ggml
    assert "--config-settings=cmake.define.GGML_NATIVE=ON" in ggml
    assert "--config-settings=cmake.define.GGML_LLAMAFILE=ON" in ggml
    assert not any("libggml" in r for r in build_reqs[2:])  # the other build requirements
    assert "--no-build-isolation" in sambay and sambay[-1] == "."
    assert info == ["-m", "sambay", "system-info"]


def test_cuda_with_overrides_and_pip_arguments(tmp_path):
    out, calls = _run(tmp_path, "cuda", "-e", ".", defines="GGML_NATIVE=OFF GGML_CPU_ARM_ARCH=armv8.2-a")
    assert out.returncode == 0, out.stderr
    ggml, sambay = calls[0], calls[2]
    defs = [a.split("cmake.define.", 1)[1] for a in ggml if "cmake.define." in a]
    assert sorted(defs) == sorted(["GGML_NATIVE=OFF", "GGML_LLAMAFILE=ON", "GGML_CUDA=ON",
                                   "CMAKE_CUDA_ARCHITECTURES=native", "GGML_CPU_ARM_ARCH=armv8.2-a"])
    assert sambay[-2:] == ["-e", "."]


def test_unknown_mode_is_refused(tmp_path):
    out, calls = _run(tmp_path, "vulkan")
    assert out.returncode == 2 and "usage" in out.stderr and calls == []
