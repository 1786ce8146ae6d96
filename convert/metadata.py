"""The model metadata KV pairs of docs/gguf-format.md ("Metadata"); tokenizer keys: vocab.py.

The ``general.*`` authorship keys and the recommended sampling settings (``general.sampling.*``)
come from gguf-py's :class:`gguf.Metadata` helpers, as llama.cpp's converter fills them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, Metadata, size_label

from sambay.engine import ARCH

from .hparams import SambayHParams
from .writer import KV

SUB_NORM_EPS = 1e-5  # hard-coded in the reference RMSNorm(128)

FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
}

_U32, _F32, _I32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.INT32
_STR, _BOOL, _ARR = GGUFValueType.STRING, GGUFValueType.BOOL, GGUFValueType.ARRAY


# The sampling the model card recommends for Phi-4-mini-flash-reasoning (its generate() example:
# temperature 0.6, top_p 0.95); used where generation_config.json gives no value (the real one
# gives none). Fields of gguf.Metadata.
MODEL_CARD_SAMPLING = {"sampling_temp": 0.6, "sampling_top_p": 0.95}


def general_metadata(src: Path, *, total_params: int, repo_id: Optional[str] = None) -> Metadata:
    """The ``general.*`` keys of a checkpoint folder, filled by gguf-py's :class:`gguf.Metadata`.

    Reads the model card's YAML header (README.md: license, base model, tags, ...), config.json's
    ``_name_or_path`` and generation_config.json's sampling values, then the folder name.

    Args:
        src: the Hugging Face checkpoint folder.
        total_params: the parameter count (for ``general.size_label``).
        repo_id: the hub repository the folder came from (``owner/name``): it names the model
            and becomes ``general.source.repo_url``.
    """
    meta = Metadata.load(None, src, None, total_params)
    if repo_id:
        full, org, basename, finetune, version, size = Metadata.get_model_id_components(repo_id, total_params)
        meta.name = Metadata.id_to_title(full) if full else meta.name
        meta.organization = Metadata.id_to_title(org) if org else meta.organization
        meta.basename = basename or meta.basename
        meta.finetune = finetune or meta.finetune
        meta.version = version or meta.version
        meta.size_label = size or meta.size_label
        meta.source_repo_url = f"https://huggingface.co/{repo_id}"
    if meta.name is None:
        meta.name = src.resolve().name
    if meta.size_label is None and total_params > 0:
        meta.size_label = size_label(total_params, 0, 0, 0)
    for field, value in MODEL_CARD_SAMPLING.items():
        if getattr(meta, field) is None:
            setattr(meta, field, value)
    return meta


def model_kvs(
    h: SambayHParams,
    *,
    outtype: GGMLQuantizationType,
    diff_lambda: Sequence[float],
    diff_lambda_init: Sequence[float],
) -> list[KV]:
    """general.file_type and phi4flash.* keys (general.architecture is added by the writer,
    the other general.* keys come from :func:`general_metadata`)."""
    a = ARCH
    return [
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
