"""Plain PyTorch reference implementation of SambaY (Phi-4-mini-flash-reasoning), test-only.

Every parity test of the project compares against this file, so it favours readability over
speed: one token-loop selective scan, explicit masks, no fused kernels. It implements the exact
math of ``shared/SAMBAY_SPEC.md`` (§0.1 overrides the rest) with the *clean* sliding-window
semantics of §5.7 (not HF's cache off-by-one, §8.2) and without HF's bf16 rounding of
activations (§0.1 item 5, §8.5): everything is computed in one dtype, float32 by default or
float64 for exactness studies.

Public API::

    model = load_reference(hf_dir, dtype=torch.float32)    # HF folder -> SambaYReference
    logits = model.forward(input_ids)                        # [T, vocab], no cache
    logits, trace = model.forward(input_ids, return_hidden=True)
    cache = model.new_cache()
    logits = model.forward_incremental(new_ids, cache)       # any number of new tokens
    model.config                                             # SambaYConfig

Block functions (``layer_norm``, ``rms_norm``, ``swiglu_mlp``, ``mamba_conv_full``,
``mamba_conv_step``, ``selective_scan``, ``diff_attention``, ``lambda_init``, ``window_mask``)
are module-level so tests and engine debugging can call them directly.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from sambay.convert.schedule import LayerKind, kv_shared_layer, layer_kinds, memory_layer

SUBLN_EPS = 1e-5  # differential-attention sub-norm eps, hard-coded in the reference code (§5.6)

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SambaYConfig:
    """The hyper-parameters the forward pass needs (spec §1), read from an HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    layer_norm_eps: float
    sliding_window: int  # W of the SWA layers (the first SWA layer's, if a list differs)
    d_state: int
    d_conv: int
    expand: int
    d_inner: int
    dt_rank: int
    mb_per_layer: int
    tie_word_embeddings: bool
    kinds: tuple[LayerKind, ...]  # per layer, from convert/schedule.py
    windows: tuple[Optional[int], ...]  # per layer: W for SWA layers, None elsewhere
    memory_layer: int  # N/2, the Mamba layer whose read-out feeds the GMUs
    kv_shared_layer: int  # N/2+1, the full-attention layer whose K/V cross layers read

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "SambaYConfig":
        """Parse an HF ``config.json`` dict (both config styles of spec §8.7).

        ``sliding_window`` may be an int (the §2 rule decides which layers are SWA) or a
        per-layer list (None where there is no window); an optional ``layer_types`` list
        (``"sliding_attention"`` marks SWA layers) is checked against the rule. Missing
        ``mamba_*`` keys take the config-class defaults (§0.1 item 1).
        """
        d = int(cfg["hidden_size"])
        n_layer = int(cfg["num_hidden_layers"])
        n_head = int(cfg["num_attention_heads"])
        n_head_kv = int(cfg["num_key_value_heads"])
        mb = int(cfg.get("mb_per_layer", 2))
        if d % n_head or n_head % 2 or n_head_kv % 2 or n_head % n_head_kv:
            raise ValueError(f"bad head counts: hidden {d}, heads {n_head}, kv heads {n_head_kv}")

        sw = cfg.get("sliding_window")
        sw_list = list(sw) if isinstance(sw, (list, tuple)) else None
        kinds = layer_kinds(n_layer, mb, sliding_window=sw_list, layer_types=cfg.get("layer_types"))
        if sw_list is not None:
            windows = [int(w) if k == LayerKind.ATTN_SWA else None for k, w in zip(kinds, sw_list)]
        else:
            if sw is None:
                raise ValueError("config has no sliding_window")
            windows = [int(sw) if k == LayerKind.ATTN_SWA else None for k in kinds]
        swa = [w for w in windows if w is not None]
        if any(w < 1 for w in swa):
            raise ValueError(f"sliding window must be >= 1, got {swa}")

        expand = int(cfg.get("mamba_expand", 2))
        dt_rank = cfg.get("mamba_dt_rank", "auto")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=d,
            intermediate_size=int(cfg["intermediate_size"]),
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=d // n_head,
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            sliding_window=swa[0] if swa else 0,
            d_state=int(cfg.get("mamba_d_state", 16)),
            d_conv=int(cfg.get("mamba_d_conv", 4)),
            expand=expand,
            d_inner=expand * d,
            dt_rank=math.ceil(d / 16) if dt_rank == "auto" else int(dt_rank),
            mb_per_layer=mb,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            kinds=tuple(kinds),
            windows=tuple(windows),
            memory_layer=memory_layer(n_layer),
            kv_shared_layer=kv_shared_layer(n_layer),
        )


def lambda_init(layer_idx: int) -> float:
    """λ_init(l) = 0.8 − 0.6·exp(−0.3·l), l = global 0-based layer index (spec §5.6)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


# ---------------------------------------------------------------------------------------------
# block functions (all take/return 2-D [tokens, features] tensors)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with weight AND bias (block pre-norms and final norm, spec §4)."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = SUBLN_EPS) -> torch.Tensor:
    """RMSNorm over the last axis (differential-attention sub-norm, spec §5.6)."""
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu_mlp(b: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU (spec §5.3): first half of fc1 = gate -> silu, second half = up."""
    g, v = (b @ fc1.T).chunk(2, dim=-1)
    return (F.silu(g) * v) @ fc2.T


def mamba_conv_full(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv over a fresh sequence (x_{<0} = 0), spec §5.4 step 2.

    x: [T, Di]; w: [Di, 1, K] (tap K−1 multiplies the current token); returns [T, Di] before
    the SiLU.
    """
    T, K = x.shape[0], w.shape[-1]
    out = F.conv1d(x.T.unsqueeze(0), w, bias, padding=K - 1, groups=x.shape[1])
    return out[0, :, :T].T


def mamba_conv_step(
    x: torch.Tensor, conv_state: torch.Tensor, w: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv continuing from a state (spec §6.1, §7).

    x: [n, Di] new raw inputs; conv_state: [K−1, Di], the previous K−1 raw inputs, oldest first
    (zeros for a fresh sequence). Returns (conv output before SiLU [n, Di], new conv state).
    """
    K = w.shape[-1]
    xs = torch.cat([conv_state, x], dim=0)  # [K-1+n, Di]
    taps = w[:, 0, :]  # [Di, K]
    out = torch.stack(
        [bias + sum(taps[:, k] * xs[t + k] for k in range(K)) for t in range(x.shape[0])]
    )
    return out, xs[xs.shape[0] - (K - 1):].clone()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan, one token at a time (spec §5.4 step 6).

    u, delta: [T, Di]; A: [Di, S] (already −exp(A_log)); B, C: [T, S]; D: [Di]; h0: [Di, S].
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·B_t·u_t;  y_t = C_t·h_t + D·u_t.
    Returns (y [T, Di], final state [Di, S]).
    """
    h = h0
    ys = []
    for t in range(u.shape[0]):
        h = torch.exp(delta[t, :, None] * A) * h + (delta[t] * u[t])[:, None] * B[t][None, :]
        ys.append(h @ C[t] + D * u[t])
    return torch.stack(ys), h


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """[Tq, Tk] bool, True where query position i may see key position j (spec §5.7):
    j ≤ i, and with a window W also j ≥ i − (W−1)."""
    diff = q_pos[:, None] - k_pos[None, :]  # i - j
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window - 1
    return mask


def diff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    lam: torch.Tensor,
    lam_init: float,
    subln_w: torch.Tensor,
    n_head: int,
    n_head_kv: int,
) -> torch.Tensor:
    """Differential attention core (spec §5.6), before out_proj.

    q: [Tq, H·hd] (original head order); k, v: [Tk, Hkv·hd]; mask: [Tq, Tk] bool.
    Stripe 1 = even heads, stripe 2 = odd heads; query pair p uses kv pair p div (H/Hkv);
    V is viewed as Hkv/2 pairs of width 2·hd. D = O1 − λ·O2, RMSNorm(2·hd)·w, ×(1−λ_init).
    Returns [Tq, H·hd], pair-major (Out_0 | Out_1 | ...).
    """
    Tq, Tk = q.shape[0], k.shape[0]
    hd = q.shape[1] // n_head
    n_pair, n_kv_pair = n_head // 2, n_head_kv // 2
    rep = n_pair // n_kv_pair  # = H / Hkv
    qs = q.view(Tq, n_pair, 2, hd)  # [:, p, s] = head 2p+s
    ks = k.view(Tk, n_kv_pair, 2, hd)
    vp = v.view(Tk, n_kv_pair, 2 * hd)  # pair g = [V head 2g | V head 2g+1]
    kv_of_pair = torch.arange(n_pair) // rep  # query pair p -> kv pair
    scale = 1.0 / math.sqrt(hd)

    outs = []
    for s in range(2):  # stripe 1 (even heads), stripe 2 (odd heads)
        qh = qs[:, :, s, :]  # [Tq, P, hd]
        kh = ks[:, kv_of_pair, s, :]  # [Tk, P, hd]
        vh = vp[:, kv_of_pair, :]  # [Tk, P, 2hd]
        scores = torch.einsum("qpd,kpd->pqk", qh, kh) * scale
        scores = scores.masked_fill(~mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("pqk,kpe->qpe", probs, vh))  # [Tq, P, 2hd]
    d = outs[0] - lam * outs[1]
    n = rms_norm(d, subln_w, SUBLN_EPS) * (1.0 - lam_init)
    return n.reshape(Tq, n_head * hd)


# ---------------------------------------------------------------------------------------------
# caches and traces


@dataclass
class SambaYCache:
    """Decode-time state of one sequence (spec §6.1).

    pos: tokens processed so far. conv[i]: [K−1, Di] last raw (pre-conv) x rows, oldest first;
    ssm[i]: [Di, S]; kv[i] = (K [n, Hkv·hd], V [n, Hkv·hd]) for the attention layers that own
    K/V: the last min(W, pos) positions for SWA layers (trimmed list), all positions for the
    full layer N/2+1 (also read by every cross layer). Key positions are implicit: the rows
    are positions pos−n .. pos−1.
    """

    pos: int = 0
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def clone(self) -> "SambaYCache":
        """A deep copy (to branch a sequence)."""
        return copy.deepcopy(self)


@dataclass
class Trace:
    """Intermediate tensors of one forward call, for block-by-block debugging.

    hidden[0] = token embeddings, hidden[i+1] = residual stream after layer i (mixer + MLP);
    mixer_out[i] = output of layer i's mixer (after its out_proj); memory = layer N/2's GMU
    memory m = y + D·u (before the z gate); final_norm = final LayerNorm output.
    All [n_tokens, features].
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    mixer_out: list[torch.Tensor] = field(default_factory=list)
    memory: Optional[torch.Tensor] = None
    final_norm: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------
# the model


class SambaYReference:
    """SambaY forward pass (spec §4–§7) over HF-named weights.

    Args:
        config: the parsed hparams.
        tensors: HF tensor name -> tensor (any float dtype; converted to ``dtype``).
        dtype: compute dtype (torch.float32 or torch.float64). The residual stream, the scan
            state and every intermediate use it.
    """

    def __init__(
        self,
        config: SambaYConfig,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
    ):
        self.config = config
        self.dtype = dtype
        self._check_tensors(tensors)
        # fresh, aligned copies: BLAS results can depend on the data pointer's alignment, and
        # safetensors hands out tensors at arbitrary file offsets (sharded vs single file)
        t = {name: x.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
             for name, x in tensors.items()}
        c = config
        self.embed = t["model.embed_tokens.weight"]
        if not c.tie_word_embeddings and "lm_head.weight" in t:
            self.lm_head = t["lm_head.weight"]
        else:
            self.lm_head = self.embed  # tied (spec §4): logits = h · Eᵀ
        self.final_norm = (t["model.final_layernorm.weight"], t["model.final_layernorm.bias"])

        # per layer: a dict of short names -> tensors
        self.layers: list[dict[str, Any]] = []
        for i, kind in enumerate(c.kinds):
            p = f"model.layers.{i}."
            a = p + "attn."
            L: dict[str, Any] = {
                "in_norm": (t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"]),
                "post_norm": (
                    t[p + "post_attention_layernorm.weight"],
                    t[p + "post_attention_layernorm.bias"],
                ),
                "fc1": t[p + "mlp.fc1.weight"],
                "fc2": t[p + "mlp.fc2.weight"],
            }
            if kind == LayerKind.MAMBA:
                L.update(
                    in_proj=t[a + "in_proj.weight"],
                    conv_w=t[a + "conv1d.weight"],
                    conv_b=t[a + "conv1d.bias"],
                    x_proj=t[a + "x_proj.weight"],
                    dt_w=t[a + "dt_proj.weight"],
                    dt_b=t[a + "dt_proj.bias"],
                    A=-torch.exp(t[a + "A_log"]),  # spec §5.4 step 5
                    D=t[a + "D"],
                    out_proj=t[a + "out_proj.weight"],
                )
            elif kind == LayerKind.GMU:
                L.update(in_proj=t[a + "in_proj.weight"], out_proj=t[a + "out_proj.weight"])
            else:
                ic = a + "inner_cross_attn."
                lam = (
                    torch.exp(torch.dot(t[ic + "lambda_q1"], t[ic + "lambda_k1"]))
                    - torch.exp(torch.dot(t[ic + "lambda_q2"], t[ic + "lambda_k2"]))
                    + lambda_init(i)
                )
                L.update(
                    wqkv=t[a + "Wqkv.weight"],
                    bqkv=t[a + "Wqkv.bias"],
                    out_w=t[a + "out_proj.weight"],
                    out_b=t[a + "out_proj.bias"],
                    subln=t[ic + "subln.weight"],
                    lam=lam,
                    lam_init=lambda_init(i),
                )
            self.layers.append(L)

    # -- weights ---------------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape for this config (spec §3; ``lm_head.weight`` optional)."""
        c = self.config
        d, ff, di, hd = c.hidden_size, c.intermediate_size, c.d_inner, c.head_dim
        out: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (c.vocab_size, d),
            "model.final_layernorm.weight": (d,),
            "model.final_layernorm.bias": (d,),
        }
        for i, kind in enumerate(c.kinds):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.attn."
            for n in ("input_layernorm", "post_attention_layernorm"):
                out[p + n + ".weight"] = (d,)
                out[p + n + ".bias"] = (d,)
            out[p + "mlp.fc1.weight"] = (2 * ff, d)
            out[p + "mlp.fc2.weight"] = (d, ff)
            if kind == LayerKind.MAMBA:
                out.update({
                    a + "in_proj.weight": (2 * di, d),
                    a + "conv1d.weight": (di, 1, c.d_conv),
                    a + "conv1d.bias": (di,),
                    a + "x_proj.weight": (c.dt_rank + 2 * c.d_state, di),
                    a + "dt_proj.weight": (di, c.dt_rank),
                    a + "dt_proj.bias": (di,),
                    a + "A_log": (di, c.d_state),
                    a + "D": (di,),
                    a + "out_proj.weight": (d, di),
                })
            elif kind == LayerKind.GMU:
                out.update({a + "in_proj.weight": (di, d), a + "out_proj.weight": (d, di)})
            else:
                n_qkv = c.n_head * hd
                if kind != LayerKind.ATTN_CROSS:
                    n_qkv += 2 * c.n_head_kv * hd  # + K and V
                ic = a + "inner_cross_attn."
                out.update({
                    a + "Wqkv.weight": (n_qkv, d),
                    a + "Wqkv.bias": (n_qkv,),
                    a + "out_proj.weight": (d, c.n_head * hd),
                    a + "out_proj.bias": (d,),
                    ic + "lambda_q1": (hd,),
                    ic + "lambda_k1": (hd,),
                    ic + "lambda_q2": (hd,),
                    ic + "lambda_k2": (hd,),
                    ic + "subln.weight": (2 * hd,),
                })
        return out

    def _check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        want = self.expected_shapes()
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want) - {"lm_head.weight"})
        if missing or extra:
            raise ValueError(f"checkpoint tensors do not match the config: missing {missing[:8]}, "
                             f"unexpected {extra[:8]}")
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, expected {shape}")
        lm_head = tensors.get("lm_head.weight")
        if lm_head is not None and tuple(lm_head.shape) != want["model.embed_tokens.weight"]:
            raise ValueError("lm_head.weight has the wrong shape")

    # -- public entry points ---------------------------------------------------------------

    def new_cache(self) -> SambaYCache:
        """An empty cache: zero conv/SSM states, no K/V (spec §6.1)."""
        c = self.config
        cache = SambaYCache()
        for i, kind in enumerate(c.kinds):
            if kind == LayerKind.MAMBA:
                cache.conv[i] = torch.zeros(c.d_conv - 1, c.d_inner, dtype=self.dtype)
                cache.ssm[i] = torch.zeros(c.d_inner, c.d_state, dtype=self.dtype)
            elif kind in (LayerKind.ATTN_SWA, LayerKind.ATTN_FULL):
                kv_dim = c.n_head_kv * c.head_dim
                empty = torch.zeros(0, kv_dim, dtype=self.dtype)
                cache.kv[i] = (empty, empty.clone())
        return cache

    @torch.no_grad()
    def forward(self, input_ids: Union[Sequence[int], torch.Tensor], return_hidden: bool = False):
        """Full forward over all positions of a fresh sequence, no cache.

        Returns logits [T, vocab] (and a :class:`Trace` if ``return_hidden``).
        """
        return self._run(self._ids(input_ids), cache=None, return_hidden=return_hidden)

    @torch.no_grad()
    def forward_incremental(
        self,
        input_ids: Union[Sequence[int], torch.Tensor],
        cache: SambaYCache,
        return_hidden: bool = False,
    ):
        """Process ``len(input_ids)`` (≥ 1) new tokens continuing from ``cache`` and update it
        in place (prefill, chunked prefill and one-token decode are all this call).

        Returns logits [n, vocab] for the new tokens (and a :class:`Trace` if asked).
        """
        return self._run(self._ids(input_ids), cache=cache, return_hidden=return_hidden)

    # -- internals -------------------------------------------------------------------------

    def _ids(self, input_ids: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("need at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError("token id out of range")
        return ids

    def _run(self, ids: torch.Tensor, cache: Optional[SambaYCache], return_hidden: bool):
        c = self.config
        n = ids.shape[0]
        start = 0 if cache is None else cache.pos
        positions = torch.arange(start, start + n)  # absolute positions of the new tokens

        trace = Trace()
        h = self.embed[ids]  # spec §5.1: no scale, no position embedding (NoPE)
        trace.hidden.append(h)
        memory: Optional[torch.Tensor] = None  # layer N/2's read-out (spec §5.4)
        shared_kv: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # K, V, key pos

        for i, (kind, L) in enumerate(zip(c.kinds, self.layers)):
            a = layer_norm(h, *L["in_norm"], c.layer_norm_eps)
            if kind == LayerKind.MAMBA:
                o, m = self._mamba(i, L, a, cache)
                if i == c.memory_layer:
                    memory = m
                    trace.memory = m
            elif kind == LayerKind.GMU:
                # spec §5.5: out_proj(silu(in_proj a) ⊙ m), m of the same token
                assert memory is not None, "GMU before the memory layer"
                o = (F.silu(a @ L["in_proj"].T) * memory) @ L["out_proj"].T
            elif kind in (LayerKind.ATTN_SWA, LayerKind.ATTN_FULL):
                o, kv = self._self_attn(i, L, a, positions, cache)
                if i == c.kv_shared_layer:
                    shared_kv = kv
            else:  # ATTN_CROSS: query-only, over layer N/2+1's K/V, causal, no window
                assert shared_kv is not None, "cross layer before the shared-KV layer"
                k, v, k_pos = shared_kv
                q = a @ L["wqkv"].T + L["bqkv"]
                o = self._attn_out(L, q, k, v, window_mask(positions, k_pos, None))
            trace.mixer_out.append(o)
            h = h + o
            h = h + swiglu_mlp(layer_norm(h, *L["post_norm"], c.layer_norm_eps), L["fc1"], L["fc2"])
            trace.hidden.append(h)

        hf = layer_norm(h, *self.final_norm, c.layer_norm_eps)
        trace.final_norm = hf
        logits = hf @ self.lm_head.T  # tied embeddings, no bias / scaling (spec §4)
        if cache is not None:
            cache.pos += n
        return (logits, trace) if return_hidden else logits

    def _mamba(self, i: int, L: dict[str, Any], a: torch.Tensor, cache: Optional[SambaYCache]):
        """Mamba-1 mixer (spec §5.4). Returns (mixer output, memory m = y + D·u)."""
        c = self.config
        x, z = (a @ L["in_proj"].T).chunk(2, dim=-1)  # x branch | z gate
        if cache is None:
            xc = mamba_conv_full(x, L["conv_w"], L["conv_b"])
            h0 = torch.zeros(c.d_inner, c.d_state, dtype=self.dtype)
        else:
            xc, cache.conv[i] = mamba_conv_step(x, cache.conv[i], L["conv_w"], L["conv_b"])
            h0 = cache.ssm[i]
        u = F.silu(xc)
        p = u @ L["x_proj"].T
        dt, B, C = torch.split(p, [c.dt_rank, c.d_state, c.d_state], dim=-1)  # δ | B | C
        delta = F.softplus(dt @ L["dt_w"].T + L["dt_b"])
        y, h_last = selective_scan(u, delta, L["A"], B, C, L["D"], h0)  # y includes D·u
        if cache is not None:
            cache.ssm[i] = h_last
        out = (y * F.silu(z)) @ L["out_proj"].T
        return out, y

    def _self_attn(self, i, L, a, positions, cache):
        """SWA / full differential self-attention (spec §5.6, §5.7); updates the layer's K/V.

        Returns (mixer output, (K, V, key positions) visible to this call's queries)."""
        c = self.config
        qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        qkv = a @ L["wqkv"].T + L["bqkv"]
        q, k_new, v_new = torch.split(qkv, [qd, kvd, kvd], dim=-1)
        window = c.windows[i]  # None for the full layer
        if cache is None:
            k, v = k_new, v_new
        else:
            k_old, v_old = cache.kv[i]
            k, v = torch.cat([k_old, k_new]), torch.cat([v_old, v_new])
        n_new = positions.shape[0]
        k_pos = torch.arange(int(positions[-1]) + 1 - k.shape[0], int(positions[-1]) + 1)
        if cache is not None:
            keep = k.shape[0] if window is None else min(window, k.shape[0])  # last W for SWA
            cache.kv[i] = (k[k.shape[0] - keep:].clone(), v[v.shape[0] - keep:].clone())
        assert k_pos.shape[0] >= n_new
        out = self._attn_out(L, q, k, v, window_mask(positions, k_pos, window))
        return out, (k, v, k_pos)

    def _attn_out(self, L, q, k, v, mask):
        c = self.config
        o = diff_attention(
            q, k, v, mask, L["lam"], L["lam_init"], L["subln"], c.n_head, c.n_head_kv
        )
        return o @ L["out_w"].T + L["out_b"]


# ---------------------------------------------------------------------------------------------
# loading


def load_safetensors_folder(hf_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json``. Tensors keep their stored dtype."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or index in {hf_dir}")
    out: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(hf_dir / fname), framework="pt") as f:
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != fname:
                    raise ValueError(f"{name} found in {fname}, index says {weight_map.get(name)}")
                if name in out:
                    raise ValueError(f"duplicate tensor {name}")
                out[name] = f.get_tensor(name)
    if weight_map is not None and set(weight_map) != set(out):
        lost = sorted(set(weight_map) - set(out))
        raise ValueError(f"index lists tensors not in the shards: {lost[:8]}")
    return out


def load_reference(hf_dir: Union[str, Path], dtype: torch.dtype = torch.float32) -> SambaYReference:
    """Build the reference model from an HF checkpoint folder (config.json + safetensors)."""
    hf_dir = Path(hf_dir)
    config = SambaYConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    return SambaYReference(config, load_safetensors_folder(hf_dir), dtype)


__all__ = [
    "SambaYConfig",
    "SambaYReference",
    "SambaYCache",
    "Trace",
    "load_reference",
    "load_safetensors_folder",
    "lambda_init",
    "layer_norm",
    "rms_norm",
    "swiglu_mlp",
    "mamba_conv_full",
    "mamba_conv_step",
    "selective_scan",
    "window_mask",
    "diff_attention",
]
