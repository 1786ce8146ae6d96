"""sambay's public exceptions, in one place.

The engine's exceptions come from the C++ side by type (never by message text):
``LoadError`` (a file that cannot be this model), ``ContextFullError`` (a call would need more
context than there is; ``n_requested`` and ``n_ctx`` attributes), ``StateError`` (a saved
state that does not fit), ``ComputeError`` (the backend is out of memory for a context, or a
graph compute failed), ``QuantizeError``. ``PullError``: ``sambay pull`` or the model cache
could not do what was asked. ``MissingDependencyError``: an optional extra is not installed.
"""

from __future__ import annotations

from .chat import ChatTemplateError
from .engine import AbortedError, ComputeError, ContextFullError, LoadError, StateError
from .gguf_metadata import GGUFMetadataError
from .quantization import QuantizeError
from .tokenizer import TokenizerError


class PullError(RuntimeError):
    """A model could not be pulled from the Hugging Face Hub or found in the model cache."""


class MissingDependencyError(RuntimeError):
    """An optional extra (``sambay[server]``, ``sambay[hub]``) is not installed."""


__all__ = [
    "AbortedError",
    "ChatTemplateError",
    "ComputeError",
    "ContextFullError",
    "GGUFMetadataError",
    "LoadError",
    "MissingDependencyError",
    "PullError",
    "QuantizeError",
    "StateError",
    "TokenizerError",
]
