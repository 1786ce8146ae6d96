"""The declarative HF -> GGUF tensor table, per layer kind (docs/gguf-format.md, "Tensors").

Each rule: HF name (suffix under ``model.layers.{i}.`` for per-layer tensors), GGUF name,
expected HF shape, storage class (the output type, or always F32) and transform.
``plan()`` expands the table over the layer schedule; nothing else in the converter knows a
tensor name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import transforms
from .hparams import SambayHParams
from .schedule import LayerKind

_Shape = Callable[[SambayHParams], tuple[int, ...]]


class Store(enum.Enum):
    """How a tensor is stored: in the output type (the big matrices) or always F32."""

    OUTTYPE = "outtype"
    F32 = "f32"


class Transform(enum.Enum):
    NONE = "none"
    SQUEEZE_CONV = "squeeze_conv"  # [Di, 1, K] -> [Di, K]
    NEG_EXP = "neg_exp"  # A = -exp(A_log)
    DEINTERLEAVE_QKV = "deinterleave_qkv"  # Q and K heads stripe-major, V untouched
    DEINTERLEAVE_Q = "deinterleave_q"  # cross layers' Q-only Wqkv
    FOLD_LAMBDA = "fold_lambda"  # not a tensor: folded into phi4flash.attention.diff_lambda


@dataclass(frozen=True)
class Rule:
    hf: str
    gguf: Optional[str]  # None: consumed into metadata
    shape: _Shape  # expected HF shape
    store: Store
    transform: Transform = Transform.NONE


_MAT, _F32 = Store.OUTTYPE, Store.F32
_SQUEEZE, _NEG_EXP = Transform.SQUEEZE_CONV, Transform.NEG_EXP
_QKV, _Q, _FOLD = Transform.DEINTERLEAVE_QKV, Transform.DEINTERLEAVE_Q, Transform.FOLD_LAMBDA


# expected HF shapes
def _d(h: SambayHParams) -> tuple[int, ...]:
    return (h.n_embd,)


def _di(h: SambayHParams) -> tuple[int, ...]:
    return (h.d_inner,)


def _qkv(h: SambayHParams) -> int:
    return (h.n_head + 2 * h.n_head_kv) * h.head_dim


def _q(h: SambayHParams) -> int:
    return h.n_head * h.head_dim


# fmt: off
GLOBAL_RULES: list[Rule] = [
    Rule("model.embed_tokens.weight",    "token_embd.weight",  lambda h: (h.n_vocab, h.n_embd), _MAT),
    Rule("model.final_layernorm.weight", "output_norm.weight", _d, _F32),
    Rule("model.final_layernorm.bias",   "output_norm.bias",   _d, _F32),
]

COMMON_RULES: list[Rule] = [
    Rule("input_layernorm.weight",          "attn_norm.weight", _d, _F32),
    Rule("input_layernorm.bias",            "attn_norm.bias",   _d, _F32),
    Rule("post_attention_layernorm.weight", "ffn_norm.weight",  _d, _F32),
    Rule("post_attention_layernorm.bias",   "ffn_norm.bias",    _d, _F32),
    # fc1 rows: gate 0..F-1, up F..2F-1 (ggml_swiglu order)
    Rule("mlp.fc1.weight", "ffn_up.weight",   lambda h: (2 * h.n_ff, h.n_embd), _MAT),
    Rule("mlp.fc2.weight", "ffn_down.weight", lambda h: (h.n_embd, h.n_ff), _MAT),
]

_ATTN_COMMON: list[Rule] = [
    Rule("attn.out_proj.weight", "attn_output.weight", lambda h: (h.n_embd, _q(h)), _MAT),
    Rule("attn.out_proj.bias",   "attn_output.bias",   _d, _F32),
    Rule("attn.inner_cross_attn.subln.weight", "attn_sub_norm.weight", lambda h: (2 * h.head_dim,), _F32),
    *[Rule(f"attn.inner_cross_attn.lambda_{v}", None, lambda h: (h.head_dim,), _F32, _FOLD)
      for v in ("q1", "k1", "q2", "k2")],
]

_SELF_ATTN: list[Rule] = [
    Rule("attn.Wqkv.weight", "attn_qkv.weight", lambda h: (_qkv(h), h.n_embd), _MAT, _QKV),
    Rule("attn.Wqkv.bias",   "attn_qkv.bias",   lambda h: (_qkv(h),), _F32, _QKV),
    *_ATTN_COMMON,
]

KIND_RULES: dict[LayerKind, list[Rule]] = {
    LayerKind.MAMBA: [
        # in_proj rows: x then z; x_proj rows: δ (R), B (S), C (S)
        Rule("attn.in_proj.weight",  "ssm_in.weight",     lambda h: (2 * h.d_inner, h.n_embd), _MAT),
        Rule("attn.conv1d.weight",   "ssm_conv1d.weight", lambda h: (h.d_inner, 1, h.d_conv), _F32, _SQUEEZE),
        Rule("attn.conv1d.bias",     "ssm_conv1d.bias",   _di, _F32),
        Rule("attn.x_proj.weight",   "ssm_x.weight",      lambda h: (h.dt_rank + 2 * h.d_state, h.d_inner), _MAT),
        Rule("attn.dt_proj.weight",  "ssm_dt.weight",     lambda h: (h.d_inner, h.dt_rank), _MAT),
        Rule("attn.dt_proj.bias",    "ssm_dt.bias",       _di, _F32),
        Rule("attn.A_log",           "ssm_a",             lambda h: (h.d_inner, h.d_state), _F32, _NEG_EXP),
        Rule("attn.D",               "ssm_d",             _di, _F32),
        Rule("attn.out_proj.weight", "ssm_out.weight",    lambda h: (h.n_embd, h.d_inner), _MAT),
    ],
    LayerKind.GMU: [
        Rule("attn.in_proj.weight",  "gmu_in.weight",  lambda h: (h.d_inner, h.n_embd), _MAT),
        Rule("attn.out_proj.weight", "gmu_out.weight", lambda h: (h.n_embd, h.d_inner), _MAT),
    ],
    LayerKind.ATTN_SWA: _SELF_ATTN,
    LayerKind.ATTN_FULL: _SELF_ATTN,
    LayerKind.ATTN_CROSS: [
        # Q-only Wqkv: K and V come from the kv_shared_layer's cache
        Rule("attn.Wqkv.weight", "attn_q.weight", lambda h: (_q(h), h.n_embd), _MAT, _Q),
        Rule("attn.Wqkv.bias",   "attn_q.bias",   lambda h: (_q(h),), _F32, _Q),
        *_ATTN_COMMON,
    ],
}
# fmt: on

# tied output: an lm_head.weight may be present; it must equal the embedding and is dropped
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class PlannedTensor:
    """One checkpoint tensor and what becomes of it."""

    hf_name: str
    gguf_name: Optional[str]
    layer: Optional[int]  # None for global tensors
    hf_shape: tuple[int, ...]
    store: Store
    transform: Transform

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        """numpy-order shape written to the GGUF."""
        if self.transform == Transform.SQUEEZE_CONV:
            return (self.hf_shape[0], self.hf_shape[2])
        return self.hf_shape


def plan(h: SambayHParams) -> list[PlannedTensor]:
    """Every tensor the checkpoint must hold, in GGUF write order (globals first, then layers)."""
    out = [
        PlannedTensor(r.hf, r.gguf, None, r.shape(h), r.store, r.transform) for r in GLOBAL_RULES
    ]
    for il, kind in enumerate(h.layer_kinds):
        for r in COMMON_RULES + KIND_RULES[kind]:
            out.append(
                PlannedTensor(
                    f"model.layers.{il}.{r.hf}",
                    f"blk.{il}.{r.gguf}" if r.gguf else None,
                    il,
                    r.shape(h),
                    r.store,
                    r.transform,
                )
            )
    return out


def apply(t: PlannedTensor, arr: np.ndarray, h: SambayHParams) -> np.ndarray:
    """The tensor's transform (shape/row order; A's -exp). ``arr`` is already in its GGUF
    storage dtype; NEG_EXP tensors are always F32."""
    if t.transform == Transform.NONE:
        return arr
    if t.transform == Transform.SQUEEZE_CONV:
        return transforms.squeeze_conv(arr)
    if t.transform == Transform.NEG_EXP:
        return transforms.neg_exp(arr)
    if t.transform == Transform.DEINTERLEAVE_QKV:
        return transforms.deinterleave_qkv(arr, h.n_head, h.n_head_kv, h.head_dim)
    if t.transform == Transform.DEINTERLEAVE_Q:
        return transforms.deinterleave_q(arr, h.n_head, h.head_dim)
    raise ValueError(f"{t.hf_name}: {t.transform} is not a tensor transform")
