"""The model metadata KV pairs of docs/gguf-format.md ("Metadata"); tokenizer keys: vocab.py."""

from __future__ import annotations

from typing import Sequence

from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from .hparams import SambayHParams
from .writer import KV

ARCH = "phi4flash"
SUB_NORM_EPS = 1e-5  # hard-coded in the reference RMSNorm(128)

FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
}

_U32, _F32, _I32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.INT32
_STR, _BOOL, _ARR = GGUFValueType.STRING, GGUFValueType.BOOL, GGUFValueType.ARRAY


def model_kvs(
    h: SambayHParams,
    *,
    name: str,
    outtype: GGMLQuantizationType,
    diff_lambda: Sequence[float],
    diff_lambda_init: Sequence[float],
) -> list[KV]:
    """general.* and phi4flash.* keys (general.architecture is added by the writer)."""
    a = ARCH
    return [
        KV("general.name", name, _STR),
        KV("general.file_type", int(FILE_TYPES[outtype]), _U32),
        KV("general.quantization_version", 2, _U32),
        KV(f"{a}.context_length", h.n_ctx_train, _U32),
        KV(f"{a}.embedding_length", h.n_embd, _U32),
        KV(f"{a}.block_count", h.n_layer, _U32),
        KV(f"{a}.feed_forward_length", h.n_ff, _U32),
        KV(f"{a}.vocab_size", h.n_vocab, _U32),
        KV(f"{a}.attention.head_count", h.n_head, _U32),
        KV(f"{a}.attention.head_count_kv", h.n_head_kv, _U32),
        KV(f"{a}.attention.key_length", h.head_dim, _U32),
        KV(f"{a}.attention.value_length", h.head_dim, _U32),
        KV(f"{a}.attention.layer_norm_epsilon", h.layer_norm_eps, _F32),
        KV(f"{a}.attention.sliding_window", h.n_swa, _U32),
        KV(f"{a}.ssm.conv_kernel", h.d_conv, _U32),
        KV(f"{a}.ssm.inner_size", h.d_inner, _U32),
        KV(f"{a}.ssm.state_size", h.d_state, _U32),
        KV(f"{a}.ssm.time_step_rank", h.dt_rank, _U32),
        KV(f"{a}.layer_types", [int(k) for k in h.layer_kinds], _ARR, _I32),
        KV(f"{a}.mb_per_layer", h.mb_per_layer, _U32),
        KV(f"{a}.memory_layer", h.memory_layer, _U32),
        KV(f"{a}.kv_shared_layer", h.kv_shared_layer, _U32),
        KV(f"{a}.attention.diff_lambda", [float(x) for x in diff_lambda], _ARR, _F32),
        KV(f"{a}.attention.diff_lambda_init", [float(x) for x in diff_lambda_init], _ARR, _F32),
        KV(f"{a}.attention.sub_norm_epsilon", SUB_NORM_EPS, _F32),
        KV(f"{a}.attention.heads_deinterleaved", True, _BOOL),
    ]
