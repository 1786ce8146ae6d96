"""Session-wide fixtures: the tiny checkpoints most test modules run on, each written and
converted once per session (convert/tiny.py through engine_helpers.make_gguf)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from engine_helpers import make_gguf, selected_device, use_test_device

TinyGGUF = Callable[..., "tuple[Path, Path]"]


def pytest_configure(config: pytest.Config) -> None:
    use_test_device()  # SAMBAY_TEST_DEVICE (engine_helpers.py)


def pytest_report_header(config: pytest.Config) -> str:
    return f"sambay test device: {selected_device() or 'auto (the engine default)'}"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    """``tiny_gguf(config="tiny-12", outtype="f32", *, dtype="float32", seed=0)`` returns
    ``(hf_dir, gguf_path)``, made once per session and shared: treat both as read-only (write
    modified copies into the test's own folder)."""
    root = tmp_path_factory.mktemp("tiny")

    def make(config: str = "tiny-12", outtype: str = "f32", *, dtype: str = "float32", seed: int = 0):
        return make_gguf(root, config, outtype, dtype=dtype, seed=seed)

    return make
