"""Token-at-a-time NumPy float64 SambaY, straight from the spec and the HF tensors; no torch.

The engine's parity tests (tests/test_engine.py) compare against this file, so testing the
engine needs no PyTorch (a Raspberry Pi user's test install stays light). It is independent of
both the engine and the PyTorch reference (tests/reference_model.py): it reads the safetensors
files itself, derives the layer kinds from the tiny configs' rule, and walks one token at a time
through explicit per-position K/V lists, conv histories and SSM states.
tests/test_reference.py checks that the two references agree to 1e-10 in float64.

Public API::

    ref = NumpyReference.from_folder(hf_dir)         # HF folder (F32, F16 or BF16 tensors)
    logits = ref.forward(ids)                          # [T, vocab] float64, a fresh sequence
    cache = ref.new_cache()
    logits = ref.forward_incremental(new_ids, cache)   # any number of new tokens
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def read_safetensors_folder(hf_dir: Union[str, Path]) -> dict[str, np.ndarray]:
    """Every tensor of every ``*.safetensors`` file in the folder, as float64.

    The format is an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the data; bf16 is the high half of f32.
    """
    out: dict[str, np.ndarray] = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            a = np.frombuffer(raw[8 + n + lo:8 + n + hi], dtype=_DTYPES[info["dtype"]])
            if info["dtype"] == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a.astype(np.float64).reshape(info["shape"])
    return out


@dataclass
class NumpyCache:
    """Everything a sequence has seen: raw conv inputs, SSM states and K/V per position."""

    pos: int = 0
    conv_in: dict[int, list[np.ndarray]] = field(default_factory=dict)
    ssm: dict[int, np.ndarray] = field(default_factory=dict)
    kv: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


class NumpyReference:
    """SambaY in float64 NumPy for the tiny test configs (spec §2: M S ... M G U X ... U X)."""

    def __init__(self, tensors: dict[str, np.ndarray], config: dict[str, Any]):
        self.t, cfg = tensors, config
        self.n_layer = N = cfg["num_hidden_layers"]
        self.n_head, self.n_head_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = cfg["hidden_size"]
        self.head_dim = self.d // self.n_head
        self.eps = cfg["layer_norm_eps"]
        self.d_state, self.d_conv = cfg.get("mamba_d_state", 16), cfg.get("mamba_d_conv", 4)
        self.d_inner = cfg.get("mamba_expand", 2) * self.d
        self.dt_rank = math.ceil(self.d / 16)
        self.window = cfg["sliding_window"]
        self.vocab_size = cfg["vocab_size"]
        # self-decoder: Mamba / SWA alternating, then the memory Mamba and the full-attention
        # layer; cross-decoder: GMU / cross-attention alternating
        self.kinds = (["M" if i % 2 == 0 else "S" for i in range(N // 2)] + ["M", "G"]
                      + ["U" if i % 2 == 0 else "X" for i in range(N // 2 + 2, N)])
        self.memory_layer, self.kv_layer = N // 2, N // 2 + 1

    @classmethod
    def from_folder(cls, hf_dir: Union[str, Path]) -> "NumpyReference":
        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        return cls(read_safetensors_folder(hf_dir), cfg)

    def new_cache(self) -> NumpyCache:
        N = self.n_layer
        return NumpyCache(conv_in={i: [] for i in range(N)},
                          ssm={i: np.zeros((self.d_inner, self.d_state)) for i in range(N)},
                          kv={i: [] for i in range(N)})

    def forward(self, ids: Iterable[int]) -> np.ndarray:
        """All-position logits [T, vocab] of a fresh sequence."""
        return self.forward_incremental(ids, self.new_cache())

    def forward_incremental(self, ids: Iterable[int], cache: NumpyCache) -> np.ndarray:
        """Logits [n, vocab] of ``ids`` appended to what ``cache`` has seen; updates it."""
        out = [self._step(int(tok), cache) for tok in ids]
        return np.stack(out) if out else np.zeros((0, self.vocab_size))

    # one token through every layer ------------------------------------------------------------

    def _ln(self, x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean()
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean() + self.eps) * self.t[p + ".weight"] + self.t[p + ".bias"]

    def _step(self, tok: int, cache: NumpyCache) -> np.ndarray:
        t = self.t
        h = t["model.embed_tokens.weight"][tok].copy()
        mem = None
        for i, kind in enumerate(self.kinds):
            p = f"model.layers.{i}."
            a = self._ln(h, p + "input_layernorm")
            if kind == "M":
                y, o = self._mamba(a, p, i, cache)
                if i == self.memory_layer:
                    mem = y
            elif kind == "U":  # GMU: gate the memory layer's SSM output
                o = t[p + "attn.out_proj.weight"] @ (_silu(t[p + "attn.in_proj.weight"] @ a) * mem)
            else:
                o = self._attention(a, p, i, kind, cache)
            h = h + o
            b = self._ln(h, p + "post_attention_layernorm")
            f = t[p + "mlp.fc1.weight"] @ b
            half = f.shape[0] // 2
            h = h + t[p + "mlp.fc2.weight"] @ (_silu(f[:half]) * f[half:])
        cache.pos += 1
        return t["model.embed_tokens.weight"] @ self._ln(h, "model.final_layernorm")

    def _mamba(self, a, p, i, cache):
        t, Di, S, K, R = self.t, self.d_inner, self.d_state, self.d_conv, self.dt_rank
        xz = t[p + "attn.in_proj.weight"] @ a
        x, z = xz[:Di], xz[Di:]
        hist = cache.conv_in[i]
        hist.append(x)
        cw = t[p + "attn.conv1d.weight"]  # [Di, 1, K], tap K-1 is the current token
        xc = t[p + "attn.conv1d.bias"].copy()
        for k in range(K):
            src = len(hist) - K + k
            if src >= 0:
                xc += cw[:, 0, k] * hist[src]
        u = _silu(xc)
        pr = t[p + "attn.x_proj.weight"] @ u
        dt, Bv, Cv = pr[:R], pr[R:R + S], pr[R + S:]
        delta = np.logaddexp(0.0, t[p + "attn.dt_proj.weight"] @ dt + t[p + "attn.dt_proj.bias"])
        A = -np.exp(t[p + "attn.A_log"])
        cache.ssm[i] = np.exp(delta[:, None] * A) * cache.ssm[i] + np.outer(delta * u, Bv)
        y = cache.ssm[i] @ Cv + t[p + "attn.D"] * u
        return y, t[p + "attn.out_proj.weight"] @ (y * _silu(z))

    def _attention(self, a, p, i, kind, cache):
        """Differential attention (spec §5.6) with its own K/V (S, G) or the shared one (X)."""
        t, H, Hkv, hd = self.t, self.n_head, self.n_head_kv, self.head_dim
        rep, pos = H // Hkv, cache.pos
        qkv = t[p + "attn.Wqkv.weight"] @ a + t[p + "attn.Wqkv.bias"]
        q = qkv[:H * hd]
        if kind in "SG":
            cache.kv[i].append((qkv[H * hd:H * hd + Hkv * hd], qkv[H * hd + Hkv * hd:]))
            kv = cache.kv[i]
        else:
            kv = cache.kv[self.kv_layer]
        lo = max(0, pos - self.window + 1) if kind == "S" else 0
        js = range(lo, pos + 1)
        heads = []
        for hh in range(H):
            # HF's interleaved heads: K head of stripe hh%2 in group hh//(2·rep); V pairs
            kh, pair = 2 * (hh // (2 * rep)) + hh % 2, hh // (2 * rep)
            Km = np.stack([kv[j][0][kh * hd:(kh + 1) * hd] for j in js])
            Vm = np.stack([kv[j][1][2 * pair * hd:(2 * pair + 2) * hd] for j in js])
            s = Km @ q[hh * hd:(hh + 1) * hd] / math.sqrt(hd)
            e = np.exp(s - s.max())
            heads.append((e / e.sum()) @ Vm)
        ic = p + "attn.inner_cross_attn."
        li = 0.8 - 0.6 * math.exp(-0.3 * i)
        lam = (math.exp(t[ic + "lambda_q1"] @ t[ic + "lambda_k1"])
               - math.exp(t[ic + "lambda_q2"] @ t[ic + "lambda_k2"]) + li)
        flat = []
        for pr in range(H // 2):
            dd = heads[2 * pr] - lam * heads[2 * pr + 1]
            rms = np.sqrt((dd * dd).mean() + 1e-5)
            flat.append((1 - li) * t[ic + "subln.weight"] * dd / rms)
        return t[p + "attn.out_proj.weight"] @ np.concatenate(flat) + t[p + "attn.out_proj.bias"]


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))
