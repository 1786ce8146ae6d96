"""config.json (+ tokenizer_config.model_max_length) -> frozen SambayHParams, checked early.

ref: configuration_phi4flash.py (spec §0.1 item 1, §1.1): the real config.json has no mamba_*
keys and an int ``sliding_window``; older revisions store a per-layer window list, newer ones
add ``layer_types``. The layer schedule itself comes from ``schedule.layer_kinds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConvertError
from .schedule import LayerKind, ScheduleError, kv_shared_layer, layer_kinds, memory_layer

ARCHITECTURE = "Phi4FlashForCausalLM"
MODEL_TYPE = "phi4flash"  # the HF config's model_type (the GGUF architecture is sambay.engine.ARCH)

# configuration_phi4flash.py defaults for keys the real config.json omits (spec §0.1 item 1)
MAMBA_DEFAULTS: dict[str, Any] = {
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": "auto",
}
MB_PER_LAYER_DEFAULT = 2


@dataclass(frozen=True)
class SambayHParams:
    """Everything the converter needs from config.json, validated."""

    n_layer: int  # num_hidden_layers (N, a multiple of 4)
    n_embd: int  # hidden_size (d)
    n_ff: int  # intermediate_size (F); fc1 has 2F rows (gate | up)
    n_vocab: int  # vocab_size: rows of the embedding
    n_head: int  # num_attention_heads (H, even)
    n_head_kv: int  # num_key_value_heads (Hkv, even, divides H)
    head_dim: int  # n_embd / n_head
    layer_norm_eps: float
    n_ctx_train: int  # context_length (see docs/gguf-format.md)
    n_swa: int  # W: window of every SWA layer
    d_conv: int  # K
    d_inner: int  # Di = expand * d
    d_state: int  # S
    dt_rank: int  # R
    mb_per_layer: int
    layer_kinds: tuple[LayerKind, ...]
    tie_word_embeddings: bool
    bos_token_id: Optional[int]  # config.json's ids: the fallback for the tokenizer's
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]

    @property
    def memory_layer(self) -> int:
        return memory_layer(self.n_layer)

    @property
    def kv_shared_layer(self) -> int:
        return kv_shared_layer(self.n_layer)


def _int(cfg: dict[str, Any], key: str, *, default: Any = None, minimum: int = 1) -> int:
    val = cfg.get(key, default)
    if val is None:
        raise ConvertError(f"config.json: missing key {key!r}")
    if isinstance(val, bool) or not isinstance(val, int):
        # json has no int/float distinction for 2.0; accept integral floats
        if isinstance(val, float) and val.is_integer():
            val = int(val)
        else:
            raise ConvertError(f"config.json: {key} must be an integer, got {val!r}")
    if val < minimum:
        raise ConvertError(f"config.json: {key} must be >= {minimum}, got {val}")
    return val


def _opt_id(cfg: dict[str, Any], key: str) -> Optional[int]:
    val = cfg.get(key)
    if isinstance(val, list):  # some configs list several eos ids: the first is "the" eos
        val = val[0] if val else None
    return val if isinstance(val, int) and not isinstance(val, bool) and val >= 0 else None


def _window_and_kinds(cfg: dict[str, Any], n_layer: int, mb: int) -> tuple[int, list[LayerKind]]:
    """W and the per-layer kinds, from any of the three config styles (spec §8.7)."""
    sw = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types)
    ):
        raise ConvertError(
            f"config.json: layer_types must be a list of strings, got {layer_types!r}"
        )
    per_layer = sw if isinstance(sw, list) else None
    try:
        kinds = layer_kinds(n_layer, mb, sliding_window=per_layer, layer_types=layer_types)
    except ScheduleError as err:
        raise ConvertError(f"config.json: {err}") from None

    if per_layer is not None:
        windows = {w for w, k in zip(per_layer, kinds) if k == LayerKind.ATTN_SWA}
        if len(windows) != 1:
            raise ConvertError(
                f"config.json: the SWA layers must share one sliding_window, got {sorted(map(str, windows))}"
            )
        sw = windows.pop()
    if sw is None:
        raise ConvertError(
            "config.json: missing key 'sliding_window' (the SWA layers need a window)"
        )
    window = _int({"sliding_window": sw}, "sliding_window")
    return window, kinds


def load_hparams(config: Any, *, model_max_length: Any = None) -> SambayHParams:
    """Validate a parsed config.json and derive the hparams.

    Args:
        config: the parsed config.json.
        model_max_length: ``tokenizer_config.json``'s value, if any (the trained context).

    Raises:
        ConvertError: on another architecture or any inconsistent or missing value.
    """
    if not isinstance(config, dict):
        raise ConvertError("config.json: not a JSON object")
    archs = config.get("architectures") or []
    if ARCHITECTURE not in archs and config.get("model_type") != MODEL_TYPE:
        raise ConvertError(
            f"config.json: not a Phi-4-mini-flash (SambaY) checkpoint: architectures={archs!r}, "
            f"model_type={config.get('model_type')!r} (expected {ARCHITECTURE} / {MODEL_TYPE})"
        )
    cfg = {**MAMBA_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if "sliding_window" in config:  # a None window is an explicit value, not "missing"
        cfg["sliding_window"] = config["sliding_window"]

    n_layer = _int(cfg, "num_hidden_layers")
    n_embd = _int(cfg, "hidden_size")
    n_head = _int(cfg, "num_attention_heads")
    n_head_kv = _int(cfg, "num_key_value_heads", default=n_head)
    if n_head % 2 or n_head_kv % 2:
        raise ConvertError(
            f"config.json: differential attention needs even head counts, got "
            f"num_attention_heads={n_head}, num_key_value_heads={n_head_kv}"
        )
    if n_head % n_head_kv:
        raise ConvertError(
            f"config.json: num_key_value_heads={n_head_kv} does not divide num_attention_heads={n_head}"
        )
    if n_embd % n_head:
        raise ConvertError(
            f"config.json: hidden_size={n_embd} is not divisible by num_attention_heads={n_head}"
        )
    head_dim = n_embd // n_head
    if "head_dim" in config and config["head_dim"] is not None and config["head_dim"] != head_dim:
        raise ConvertError(
            f"config.json: head_dim={config['head_dim']} != hidden_size/num_attention_heads={head_dim}"
        )

    mb = _int(cfg, "mb_per_layer", default=MB_PER_LAYER_DEFAULT)
    n_swa, kinds = _window_and_kinds(cfg, n_layer, mb)

    eps = cfg.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
        raise ConvertError(
            f"config.json: layer_norm_eps must be a small positive number, got {eps!r}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"config.json: hidden_act must be 'silu', got {act!r}")
    for key, want in (
        ("mamba_conv_bias", True),
        ("mamba_proj_bias", False),
        ("mlp_bias", False),
        ("lm_head_bias", False),
    ):
        if key in cfg and cfg[key] is not want:
            raise ConvertError(
                f"config.json: {key}={cfg[key]!r} is not supported (SambaY has {want})"
            )

    expand = _int(cfg, "mamba_expand")
    dt_rank_raw = cfg["mamba_dt_rank"]
    dt_rank = math.ceil(n_embd / 16) if dt_rank_raw == "auto" else _int(cfg, "mamba_dt_rank")

    max_pos = _int(cfg, "max_position_embeddings")
    n_ctx = max_pos
    if isinstance(model_max_length, (int, float)) and not isinstance(model_max_length, bool):
        if 0 < model_max_length <= max_pos:
            n_ctx = int(model_max_length)

    tie = cfg.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ConvertError(f"config.json: tie_word_embeddings must be a bool, got {tie!r}")

    return SambayHParams(
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=_int(cfg, "intermediate_size"),
        n_vocab=_int(cfg, "vocab_size"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        layer_norm_eps=float(eps),
        n_ctx_train=n_ctx,
        n_swa=n_swa,
        d_conv=_int(cfg, "mamba_d_conv"),
        d_inner=expand * n_embd,
        d_state=_int(cfg, "mamba_d_state"),
        dt_rank=dt_rank,
        mb_per_layer=mb,
        layer_kinds=tuple(kinds),
        tie_word_embeddings=tie,
        bos_token_id=_opt_id(config, "bos_token_id"),
        eos_token_id=_opt_id(config, "eos_token_id"),
        pad_token_id=_opt_id(config, "pad_token_id"),
    )
