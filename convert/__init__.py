"""HF safetensors checkpoint of Phi-4-mini-flash-reasoning (SambaY) -> sambay GGUF.

Layout: docs/gguf-format.md. Shipped in the wheel as ``sambay.convert``; ``python -m
sambay.convert HF_DIR OUT.gguf`` and ``sambay convert`` run it. Modules: hparams (config),
schedule (layer kinds), safetensors_reader, tensor_map (the name table), transforms, vocab
(tokenizer keys), metadata (model keys), writer (streaming GGUF), pipeline (convert()).
"""

from __future__ import annotations

from .errors import ConvertError, ConvertWarning
from .pipeline import convert

__all__ = ["ConvertError", "ConvertWarning", "convert"]
