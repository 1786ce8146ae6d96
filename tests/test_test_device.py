"""The SAMBAY_TEST_DEVICE knob (engine_helpers.use_test_device, applied by conftest.py) that
places the engine tests' models on a chosen device, e.g. on a GPU machine
(scripts/check-gpu.sh): run here with a device this machine has (the CPU) and with one it
lacks, each in its own pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# a short engine test whose model is made with the default device
TARGET = "test_batch.py::test_comparison_detects_a_mixed_up_sequence"


def _pytest(device: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAMBAY_TEST_DEVICE=device)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", TARGET],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)


def test_cpu_runs_the_engine_tests_there():
    out = _pytest("cpu")
    assert out.returncode == 0, out.stdout[-2000:]
    assert "sambay test device: CPU" in out.stdout


def test_a_missing_device_fails_the_engine_tests():
    # the knob reaches every Model the tests make: a device ggml does not have is an error,
    # never a silent run on the CPU
    out = _pytest("NoSuchDevice0")
    assert out.returncode != 0
    assert "no ggml device named 'NoSuchDevice0'" in out.stdout
