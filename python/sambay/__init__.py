"""sambay: run Phi-4-mini-flash-reasoning (the SambaY architecture) from GGUF files on ggml."""

from __future__ import annotations

import logging as _logging

# a library logs, the application decides where it goes (ggml's lines arrive as "sambay.ggml")
_logging.getLogger("sambay").addHandler(_logging.NullHandler())

from ._system import system_info
from ._version import __version__
from .demo import demo_model_path
from .errors import (AbortedError, ChatTemplateError, ComputeError, ContextFullError, GGUFMetadataError,
                     LoadError, MissingDependencyError, PullError, QuantizeError, StateError, TokenizerError)
from .llama import Llama, LlamaState
from .llm import LLM, CompletionOutput, GenerationParams, RequestOutput
from .quantization import QUANT_TYPES, quantize
from .sampling import LogitsProcessorList, SamplingParams, StoppingCriteriaList
from .structured import GrammarError

__all__ = [
    "AbortedError",
    "ChatTemplateError",
    "ComputeError",
    "ContextFullError",
    "GGUFMetadataError",
    "CompletionOutput",
    "GenerationParams",
    "LLM",
    "GrammarError",
    "Llama",
    "LlamaState",
    "LoadError",
    "LogitsProcessorList",
    "MissingDependencyError",
    "PullError",
    "QUANT_TYPES",
    "QuantizeError",
    "RequestOutput",
    "SamplingParams",
    "StateError",
    "StoppingCriteriaList",
    "TokenizerError",
    "__version__",
    "demo_model_path",
    "quantize",
    "system_info",
]
