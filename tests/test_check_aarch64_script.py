"""scripts/check-aarch64.sh, without emulating anything: the test files it names exist, and it
refuses a root inside the repository before touching the system."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check-aarch64.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32",
                                reason="a bash script")


def test_the_named_test_files_exist():
    default = re.search(r'tests=\$\{SAMBAY_AARCH64_TESTS:-"([^"]+)"\}', SCRIPT.read_text())
    assert default, "the default test list moved"
    names = default.group(1).split()
    assert "tests/test_engine.py" in names and "tests/test_convert_exact.py" in names
    assert [n for n in names if not (ROOT / n).is_file()] == []


def test_a_root_inside_the_repository_is_refused(tmp_path):
    env = dict(os.environ, SAMBAY_AARCH64_ROOT=str(ROOT / "aarch64-root"))
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "outside the repository" in out.stderr
    assert not (ROOT / "aarch64-root").exists()


def test_an_unknown_mode_is_a_usage_error():
    out = subprocess.run(["bash", str(SCRIPT), "pi4"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
