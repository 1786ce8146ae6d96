"""Imports the compiled engine, ``sambay._core``.

The extension finds ggml through its rpath (``$ORIGIN/../libggml/lib64`` and ``.../lib``: the
Linux wheels' and a source build's folders). When sambay and libggml-python sit in different
site directories (``pip install --target``), that rpath misses; then the ggml libraries are
loaded by absolute path first, so the loader finds them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


def _preload_ggml() -> None:
    import libggml

    root = Path(libggml.__file__).parent
    if sys.platform == "win32":
        for sub in ("bin", "lib"):
            if (root / sub).is_dir():
                os.add_dll_directory(str(root / sub))
        return
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    for name in ("ggml-base", "ggml-cpu", "ggml"):
        for sub in ("lib64", "lib"):
            path = root / sub / f"lib{name}{suffix}"
            if path.exists():
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                break


try:
    from . import _core
except ImportError:
    _preload_ggml()
    from . import _core

__all__ = ["_core"]
