"""llama-cpp-python's ``Llama(...)`` keywords: those with a meaning here mapped, the rest
accepted with one warning each (a script written for llama-cpp-python runs unchanged)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

# llama-cpp-python's constructor keywords that change nothing here
IGNORED_KEYWORDS = frozenset({
    "split_mode", "main_gpu", "tensor_split", "rpc_servers", "vocab_only", "use_mlock", "kv_overrides",
    "rope_scaling_type", "pooling_type", "rope_freq_base", "rope_freq_scale", "yarn_ext_factor",
    "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "embedding", "offload_kqv",
    "op_offload", "swa_full", "no_perf", "last_n_tokens_size", "lora_base", "lora_scale", "lora_path",
    "numa", "chat_handler", "draft_model", "tokenizer", "spm_infill",
})
# llama.cpp's random seed (LLAMA_DEFAULT_SEED), and -1 as llama-cpp-python documents it
RANDOM_SEEDS = (-1, 0xFFFFFFFF)
# ggml_type ids (ggml.h) and names of the attention-cache types sambay has
KV_TYPES = {0: "f32", 1: "f16", 30: "bf16", "f32": "f32", "f16": "f16", "bf16": "bf16"}

_warned: set[str] = set()


def warn_ignored(names: Any) -> None:
    """One warning per keyword and process."""
    for name in sorted(set(names) - _warned):
        _warned.add(name)
        warnings.warn(f"Llama({name}=...) is llama-cpp-python's and has no effect in sambay", stacklevel=4)


def resolve(extra: dict[str, Any], *, n_batch: int, n_ubatch: Optional[int], kv_type: str,
            type_k: Any, type_v: Any, seed: Optional[int]) -> tuple[int, str, Optional[int]]:
    """``(n_batch, kv_type, seed)`` with llama-cpp-python's keywords applied.

    ``n_ubatch`` bounds the micro-batch (sambay's ``n_batch`` is llama.cpp's ubatch);
    ``type_k``/``type_v`` (ggml type ids or names) set ``kv_type`` (both the same: one type for
    both caches); ``seed`` -1 (or llama.cpp's default seed) means random. ``extra``: the other
    keywords given; known llama-cpp-python ones warn once, anything else is a TypeError.

    Raises:
        TypeError: an unknown keyword.
        ValueError: a cache type sambay does not have, or different K and V types.
    """
    unknown = sorted(set(extra) - IGNORED_KEYWORDS)
    if unknown:
        raise TypeError(f"Llama() got an unexpected keyword argument {unknown[0]!r}")
    warn_ignored(extra)
    if n_ubatch is not None:
        if isinstance(n_ubatch, bool) or not isinstance(n_ubatch, int) or n_ubatch < 1:
            raise ValueError(f"n_ubatch must be an integer >= 1, got {n_ubatch!r}")
        n_batch = min(n_batch, n_ubatch)
    if seed in RANDOM_SEEDS:
        seed = None
    return n_batch, cache_type(type_k, type_v) or kv_type, seed


def cache_type(type_k: Any, type_v: Any) -> Optional[str]:
    """The attention-cache type that llama-cpp-python's ``type_k``/``type_v`` (or llama.cpp's
    ``-ctk``/``-ctv``) name: ggml type ids or names, the same for both; None when neither is given.

    Raises:
        ValueError: a cache type sambay does not have, or different K and V types.
    """
    given = [t for t in (type_k, type_v) if t is not None]
    types = {KV_TYPES.get(t.lower() if isinstance(t, str) else t) for t in given}
    if None in types:
        raise ValueError(f"type_k/type_v must be one of f32, f16, bf16 (ggml type 0, 1, 30), "
                         f"got {type_k!r}/{type_v!r}")
    if len(types) > 1:
        raise ValueError(f"type_k and type_v must be the same here (one type for both caches), "
                         f"got {type_k!r} and {type_v!r}")
    return types.pop() if types else None


def chat_format_template(chat_format: Optional[str], chat_template: Optional[str]) -> Optional[str]:
    """``chat_template`` with llama-cpp-python's ``chat_format`` applied: a format that sambay
    has as a built-in template (:data:`sambay.chat.BUILTIN_TEMPLATES`) means that template.

    Raises:
        ValueError: an unknown ``chat_format``, or both keywords given.
    """
    if chat_format is None:
        return chat_template
    from .chat import BUILTIN_TEMPLATES

    if chat_format not in BUILTIN_TEMPLATES:
        raise ValueError(f"chat_format={chat_format!r} is not one of sambay's templates "
                         f"({', '.join(BUILTIN_TEMPLATES)}); leave it unset for the GGUF's own chat template, "
                         f"or give Jinja text as chat_template=")
    if chat_template is not None:
        raise ValueError("give chat_format or chat_template, not both")
    return chat_format
