"""scripts/check-gpu.sh, without a GPU: it parses, prints its usage, refuses an unknown phase,
and runs its steps in order through a stand-in Python that records ``-m ...`` calls (with the
SAMBAY_TEST_DEVICE each one sees) and runs everything else for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check-gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32",
                                reason="a bash script")


def _run(tmp_path, *args, system_info="devices:\n  CUDA0 [gpu] NVIDIA stand-in\n", timeout_s=None):
    fake = tmp_path / "python"
    (tmp_path / "info.txt").write_text(system_info)
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "sambay" ]; then cat ' + str(tmp_path / "info.txt") + "; exit 0; fi\n"
        'if [ "$1" = "-m" ]; then echo "CALL device=${SAMBAY_TEST_DEVICE:-} $*"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), SAMBAY_CHECK_OUT=str(tmp_path / "out"),
               SAMBAY_CHECK_WORKDIR=str(tmp_path / "work"))
    for k in ("SAMBAY_TEST_DEVICE", "SAMBAY_GGML_DEFINES", "SAMBAY_CHECK_TIMEOUT"):
        env.pop(k, None)
    if timeout_s is not None:
        env["SAMBAY_CHECK_TIMEOUT"] = str(timeout_s)
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)
    calls = [line[len("CALL "):].split() for line in out.stdout.splitlines() if line.startswith("CALL ")]
    return out, calls


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_usage_names_every_phase_and_knob(tmp_path):
    out, calls = _run(tmp_path, "--help")
    assert out.returncode == 0 and not calls
    for word in ("build", "test", "bench", "all", "SAMBAY_CHECK_TIMEOUT", "SAMBAY_TEST_DEVICE",
                 "SAMBAY_CHECK_WORKDIR", "SAMBAY_CHECK_OUT", "bench/results/gpu-"):
        assert word in out.stdout, word
    bad, calls = _run(tmp_path, "speed")
    assert bad.returncode == 2 and not calls
    assert "unknown phase 'speed'" in bad.stderr and "SAMBAY_CHECK_TIMEOUT" in bad.stderr


def test_all_builds_with_cuda_tests_on_the_gpu_then_measures(tmp_path):
    out, calls = _run(tmp_path, "all")
    assert out.returncode == 0, out.stderr
    ggml, _, sambay = calls[:3]
    assert "--config-settings=cmake.define.GGML_CUDA=ON" in ggml
    assert sambay[-2:] == ["-e", "."]
    tests = next(c for c in calls if c[2] == "pytest")
    assert tests[0] == "device=cuda"  # every layer of the test models on the first CUDA device
    for f in ("tests/test_engine.py", "tests/test_batch.py", "tests/test_flash_split.py"):
        assert f in tests
    peers = next(c for c in calls if c[2] == "bench.peers")
    assert peers[0] == "device="  # the benchmarks choose their own device (auto: the GPU)
    assert {"--full", "--prefill", "512,8192", "--decode", "512,32768", "--out", str(tmp_path / "out")} <= set(peers)
    batched = next(c for c in calls if c[2] == "bench.batched")
    assert "--full" in batched and str(tmp_path / "work") in batched and str(tmp_path / "work") in peers
    assert [c[2] for c in calls].index("pytest") < [c[2] for c in calls].index("bench.peers")
    assert "system-info" not in " ".join(" ".join(c) for c in calls)  # answered by the stand-in
    assert (tmp_path / "out" / "machine.txt").read_text().count("CUDA0") == 1


def test_a_build_without_cuda_stops_before_the_tests(tmp_path):
    out, calls = _run(tmp_path, "all", system_info="devices:\n  CPU [cpu] stand-in\n")
    assert out.returncode == 1
    assert "no CUDA device" in out.stderr
    assert not any(c[2] == "pytest" for c in calls)


def test_the_time_budget_stops_the_script(tmp_path):
    out, calls = _run(tmp_path, "test", timeout_s=3)
    assert out.returncode == 124
    assert "out of time" in out.stderr and not calls
