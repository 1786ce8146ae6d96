"""The one place that says what happens to the PyTorch-based tests where torch is absent."""

from __future__ import annotations

from types import ModuleType

import pytest

WHY = ("torch is not installed: these tests check the PyTorch reference model, or compare with "
       "torch (the test extra installs it except on Linux aarch64, see pyproject.toml); the "
       "engine's parity tests and the converter's tests use NumPy and run without it")


def import_torch() -> ModuleType:
    """``torch``, or skip the calling test module (or fixture) with the reason above."""
    return pytest.importorskip("torch", reason=WHY)
