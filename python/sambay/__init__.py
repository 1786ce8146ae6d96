"""sambay: run Phi-4-mini-flash-reasoning (the SambaY architecture) from GGUF files on ggml."""

from __future__ import annotations

from ._version import __version__
from ._system import system_info

__all__ = ["__version__", "system_info"]
