"""Session-wide fixtures: the tiny checkpoints most test modules run on, each written and
converted once per session (convert/tiny.py through engine_helpers.make_gguf)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from engine_helpers import make_gguf

TinyGGUF = Callable[..., "tuple[Path, Path]"]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    """``tiny_gguf(config="tiny-12", outtype="f32", *, dtype="float32", seed=0)`` returns
    ``(hf_dir, gguf_path)``, made once per session and shared: treat both as read-only (write
    modified copies into the test's own folder)."""
    root = tmp_path_factory.mktemp("tiny")

    def make(config: str = "tiny-12", outtype: str = "f32", *, dtype: str = "float32", seed: int = 0):
        return make_gguf(root, config, outtype, dtype=dtype, seed=seed)

    return make
