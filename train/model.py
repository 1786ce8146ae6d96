"""A trainable, batched SambaY with exactly the reference's math (tests/reference_model.py).

``SambaYTrain`` holds the parameters under their Hugging Face names, so a trained model is
exported as-is (``state_dict_hf``) and then loaded by the reference, the converter and the
engine. Its forward is the reference forward (spec §4-§7) computed over a batch
[B, T] of right-padded sequences, with two speed changes that do not change the math:

* attention runs through ``scaled_dot_product_attention`` with the same masks and scale;
* the selective scan is a custom autograd function (the same token recurrence
  h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·u_t, y_t = C_t·h_t + D·u_t, with a hand-written reverse
  recurrence for the gradients) instead of a long chain of autograd nodes.

tests/test_demo_training.py checks the forward against ``SambaYReference`` to float64 noise.
Right padding is harmless: every block is causal, so positions before the padding never see it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_model import SambaYConfig, lambda_init, layer_norm, rms_norm, swiglu_mlp  # noqa: E402

from sambay.convert.schedule import LayerKind  # noqa: E402
from sambay.convert.tiny import tensor_specs  # noqa: E402

SUBLN_EPS = 1e-5


class SelectiveScan(torch.autograd.Function):
    """The Mamba-1 selective scan without the D·u term (added outside), h_{-1} = 0:

        h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t·u_t) ⊗ B_t,    y_t = h_t · C_t

    delta, du (= Δ·u): [B, T, Di]; A: [Di, S]; Bm, C: [B, T, S]. Returns y [B, T, Di].
    The forward is the reference's token loop; the backward runs the reverse recurrence
    dL/dh_t = gy_t ⊗ C_t + exp(Δ_{t+1} ⊗ A) ⊙ dL/dh_{t+1} and reduces the rest in bulk.
    """

    @staticmethod
    def forward(ctx, delta, A, du, Bm, C):
        Bsz, T, Di = delta.shape
        dA = torch.exp(delta[..., None] * A)  # [B, T, Di, S]
        hs = du[..., None] * Bm[:, :, None, :]  # dBu, overwritten in place by the states
        h = hs[:, 0]
        for t in range(1, T):
            h = torch.addcmul(hs[:, t], dA[:, t], h, out=hs[:, t])
        y = torch.einsum("btds,bts->btd", hs, C)
        ctx.save_for_backward(delta, A, du, Bm, C, dA, hs)
        return y

    @staticmethod
    def backward(ctx, gy):
        delta, A, du, Bm, C, dA, hs = ctx.saved_tensors
        T = delta.shape[1]
        gh_all = gy[..., None] * C[:, :, None, :]  # gy_t ⊗ C_t, accumulated in place below
        gh = gh_all[:, T - 1]
        for t in range(T - 2, -1, -1):
            gh = torch.addcmul(gh_all[:, t], dA[:, t + 1], gh, out=gh_all[:, t])
        gC = torch.einsum("btd,btds->bts", gy, hs)
        gdu = torch.einsum("btds,bts->btd", gh_all, Bm)
        gB = torch.einsum("btds,btd->bts", gh_all, du)
        # d h_t / d(Δ_t A) = dA_t ⊙ h_{t-1}  (zero at t = 0)
        q = gh_all[:, 1:] * dA[:, 1:] * hs[:, :-1]
        gdelta = torch.zeros_like(delta)
        gdelta[:, 1:] = torch.einsum("btds,ds->btd", q, A)
        Di, S = A.shape
        # gA[d, s] = Σ_{b,t} q[b, t, d, s]·Δ[b, t, d], as a per-channel batched matmul
        gA = torch.bmm(delta[:, 1:].reshape(-1, Di).T.unsqueeze(1),
                       q.reshape(-1, Di, S).transpose(0, 1)).squeeze(1)
        return gdelta, gA, gdu, gB, gC


def init_params(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Training initialisation (Mamba's and the differential transformer's usual choices), under
    the HF names of ``sambay.convert.tiny.tensor_specs`` (so the layout is the real one)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SambaYConfig.from_hf(config)
    n_layer = cfg.n_layer
    out: dict[str, torch.Tensor] = {}

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    for name, shape, _, _ in tensor_specs(config):
        leaf = name.split(".")[-2] + "." + name.split(".")[-1]
        if name.endswith("layernorm.weight") or name.endswith("subln.weight"):
            x = torch.ones(shape)
        elif name.endswith("layernorm.bias"):
            x = torch.zeros(shape)
        elif name.endswith("A_log"):
            x = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif name.endswith(".D"):
            x = torch.ones(shape)
        elif leaf == "conv1d.weight":
            x = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[-1])
        elif leaf == "conv1d.bias":
            x = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[-1])
        elif leaf == "x_proj.weight":
            x = normal(shape, shape[1] ** -0.5)
        elif leaf == "dt_proj.weight":
            x = normal(shape, shape[1] ** -0.5)
        elif leaf == "dt_proj.bias":
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3))
            x = dt + torch.log(-torch.expm1(-dt))
        elif "lambda_" in name:
            x = normal(shape, 0.1)
        elif name.endswith(".bias"):
            x = torch.zeros(shape)
        elif leaf in ("out_proj.weight", "fc2.weight"):
            x = normal(shape, 0.02 / math.sqrt(2 * n_layer))
        else:
            x = normal(shape, 0.02)
        out[name] = x.float()
    return out


class SambaYTrain(torch.nn.Module):
    """Batched SambaY forward over HF-named parameters (see the module docstring)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], dtype=torch.float32):
        super().__init__()
        self.hf_config = dict(config)
        self.cfg = SambaYConfig.from_hf(config)
        self.names = list(tensors)
        self.p = torch.nn.ParameterDict({
            n.replace(".", "__"): torch.nn.Parameter(t.detach().to(dtype).clone())
            for n, t in tensors.items()
        })

    def w(self, name: str) -> torch.Tensor:
        return self.p[name.replace(".", "__")]

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        return {n: self.w(n).detach().float().contiguous() for n in self.names}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab] (every sequence starts at position 0)."""
        c = self.cfg
        w = self.w
        Bsz, T = ids.shape
        eps = c.layer_norm_eps
        E = w("model.embed_tokens.weight")
        h = E[ids]
        pos = torch.arange(T)
        diff = pos[:, None] - pos[None, :]
        causal = diff >= 0
        memory: Optional[torch.Tensor] = None
        shared_kv = None
        for i, kind in enumerate(c.kinds):
            p, a_ = f"model.layers.{i}.", f"model.layers.{i}.attn."
            a = layer_norm(h, w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), eps)
            if kind == LayerKind.MAMBA:
                o, y = self._mamba(a_, a)
                if i == c.memory_layer:
                    memory = y
            elif kind == LayerKind.GMU:
                o = (F.silu(a @ w(a_ + "in_proj.weight").T) * memory) @ w(a_ + "out_proj.weight").T
            else:
                qkv = a @ w(a_ + "Wqkv.weight").T + w(a_ + "Wqkv.bias")
                if kind == LayerKind.ATTN_CROSS:
                    q = qkv
                    k, v = shared_kv
                    mask = causal
                else:
                    qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
                    q, k, v = torch.split(qkv, [qd, kvd, kvd], dim=-1)
                    win = c.windows[i]
                    mask = causal if win is None else causal & (diff <= win - 1)
                    if i == c.kv_shared_layer:
                        shared_kv = (k, v)
                o = self._diff_attn(i, a_, q, k, v, mask)
            h = h + o
            hn = layer_norm(h, w(p + "post_attention_layernorm.weight"),
                            w(p + "post_attention_layernorm.bias"), eps)
            h = h + swiglu_mlp(hn, w(p + "mlp.fc1.weight"), w(p + "mlp.fc2.weight"))
        hf = layer_norm(h, w("model.final_layernorm.weight"), w("model.final_layernorm.bias"), eps)
        return hf @ E.T

    def _mamba(self, a_: str, a: torch.Tensor):
        c, w = self.cfg, self.w
        T = a.shape[1]
        x, z = (a @ w(a_ + "in_proj.weight").T).chunk(2, dim=-1)
        K = c.d_conv
        xc = F.conv1d(x.transpose(1, 2), w(a_ + "conv1d.weight"), w(a_ + "conv1d.bias"),
                      padding=K - 1, groups=c.d_inner)[:, :, :T].transpose(1, 2)
        u = F.silu(xc)
        pr = u @ w(a_ + "x_proj.weight").T
        dt, Bm, Cm = torch.split(pr, [c.dt_rank, c.d_state, c.d_state], dim=-1)
        delta = F.softplus(dt @ w(a_ + "dt_proj.weight").T + w(a_ + "dt_proj.bias"))
        A = -torch.exp(w(a_ + "A_log"))
        y = SelectiveScan.apply(delta, A, delta * u, Bm, Cm) + w(a_ + "D") * u
        out = (y * F.silu(z)) @ w(a_ + "out_proj.weight").T
        return out, y

    def _diff_attn(self, i, a_, q, k, v, mask):
        c, w = self.cfg, self.w
        Bsz, Tq, _ = q.shape
        Tk = k.shape[1]
        hd = c.head_dim
        P, Pkv = c.n_head // 2, c.n_head_kv // 2
        kv_of_pair = torch.arange(P) // (P // Pkv)
        qs = q.view(Bsz, Tq, P, 2, hd)
        ks = k.view(Bsz, Tk, Pkv, 2, hd)[:, :, kv_of_pair]
        vp = v.view(Bsz, Tk, Pkv, 2 * hd)[:, :, kv_of_pair].transpose(1, 2)  # [B, P, Tk, 2hd]
        ic = a_ + "inner_cross_attn."
        lam = (torch.exp(torch.dot(w(ic + "lambda_q1"), w(ic + "lambda_k1")))
               - torch.exp(torch.dot(w(ic + "lambda_q2"), w(ic + "lambda_k2"))) + lambda_init(i))
        outs = []
        for s in range(2):
            outs.append(F.scaled_dot_product_attention(
                qs[:, :, :, s].transpose(1, 2), ks[:, :, :, s].transpose(1, 2), vp,
                attn_mask=mask, scale=1.0 / math.sqrt(hd)))  # [B, P, Tq, 2hd]
        d = outs[0] - lam * outs[1]
        n = rms_norm(d, w(ic + "subln.weight"), SUBLN_EPS) * (1.0 - lambda_init(i))
        n = n.transpose(1, 2).reshape(Bsz, Tq, c.n_head * hd)
        return n @ w(a_ + "out_proj.weight").T + w(a_ + "out_proj.bias")
