"""Pure tensor transforms of the HF -> GGUF conversion (docs/gguf-format.md, "Tensors").

Shapes are numpy order (outermost first). Every function returns a new C-contiguous array
and leaves its input alone.
ref: spec §5.4 (A = -exp(A_log)), §5.6 (head striping, λ), §10 (de-interleave).
"""

from __future__ import annotations

import decimal

import numpy as np
from gguf import GGMLQuantizationType

# --------------------------------------------------------------------------------------------
# dtype conversion (bf16 handled as uint16 bit patterns: numpy has no bfloat16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exact (the bf16 bits are the f32 high half)."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: one temporary, not two
    return wide.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (as torch); NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x0040)  # keep sign, force quiet
    return out


def cast(arr: np.ndarray, src: str, dst: GGMLQuantizationType) -> np.ndarray:
    """Convert an array read from safetensors (dtype ``src``: F32, F16 or raw BF16 bits) to
    the GGUF storage type ``dst`` (F32, F16 or BF16 as uint16 bits). Same shape."""
    if dst == GGMLQuantizationType.BF16 and src == "BF16":
        return np.ascontiguousarray(arr)  # bit-exact passthrough
    f32 = bf16_to_f32(arr) if src == "BF16" else arr.astype(np.float32, copy=False)
    if dst == GGMLQuantizationType.F32:
        return np.ascontiguousarray(f32, dtype=np.float32)
    if dst == GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):  # |x| > 65504 becomes inf, as in every f16 converter
            return np.ascontiguousarray(f32.astype(np.float16))
    if dst == GGMLQuantizationType.BF16:
        return f32_to_bf16(f32)
    raise ValueError(f"unsupported GGUF type {dst!r}")


def count_nonfinite(arr: np.ndarray, gtype: GGMLQuantizationType) -> int:
    """NaN and Inf values in an array of storage type ``gtype`` (BF16 as uint16 bits)."""
    if gtype == GGMLQuantizationType.BF16:
        return int(np.count_nonzero((arr & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


# --------------------------------------------------------------------------------------------
# tensor transforms


def neg_exp(a_log: np.ndarray) -> np.ndarray:
    """Mamba's A = -exp(A_log) as float32: the correctly rounded value, so the same bytes on
    every platform.

    float32 ``np.exp`` is not correctly rounded, and its last bit differs between NumPy's x86
    SIMD code and its aarch64 code. Here exp runs in float64 (a few float64 ulps of error, about
    2^-29 of a float32 ulp on every platform) and is rounded once to float32. That is the
    correctly rounded float32 unless the float64 value lies within 2^-40 (relative) of a point
    halfway between two float32 values; those rare values are settled by Python's ``decimal``,
    whose exp is correctly rounded and runs in software (exp of a non-zero float is never
    exactly halfway).

    [Di, S] -> [Di, S] (ne [S, Di])
    """
    x = np.asarray(a_log, dtype=np.float32).astype(np.float64)
    y = np.exp(x)
    out = y.astype(np.float32)
    lo = (y * (1.0 - _F32_TIE_WINDOW)).astype(np.float32)
    hi = (y * (1.0 + _F32_TIE_WINDOW)).astype(np.float32)
    for i in np.flatnonzero((lo != hi) & np.isfinite(lo) & np.isfinite(hi)):
        out.flat[i] = _exp_nearer(float(x.flat[i]), lo.flat[i], hi.flat[i])
    return -out


# relative distance from a float32 rounding boundary inside which float64 exp cannot decide
_F32_TIE_WINDOW = 2.0**-40


def _exp_nearer(x: float, lo: np.float32, hi: np.float32) -> np.float32:
    # exp(x) lies between the adjacent float32 values lo < hi: the one nearer to it. Decimal's
    # constructor and comparisons are exact, and 120 digits put exp(x) far closer to its true
    # value than to any float32 midpoint.
    with decimal.localcontext() as ctx:
        ctx.prec = 120
        e = decimal.Decimal(x).exp()
        mid = (decimal.Decimal(float(lo)) + decimal.Decimal(float(hi))) / 2
    return hi if e > mid else lo


def squeeze_conv(w: np.ndarray) -> np.ndarray:
    """Depthwise conv weight [Di, 1, K] -> [Di, K] (ne [K, Di]); tap K-1 is the current token."""
    if w.ndim != 3 or w.shape[1] != 1:
        raise ValueError(f"expected a [Di, 1, K] conv weight, got {w.shape}")
    return np.ascontiguousarray(w[:, 0, :])


def stripe_major_order(n_heads: int) -> list[int]:
    """Head order after the de-interleave: even heads (stripe 1), then odd heads (stripe 2)."""
    return list(range(0, n_heads, 2)) + list(range(1, n_heads, 2))


def _permute_heads(x: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    # x: [n_heads*head_dim, ...] -> same shape, head blocks of head_dim rows reordered
    blocks = x.reshape(n_heads, head_dim, *x.shape[1:])
    return blocks[stripe_major_order(n_heads)].reshape(x.shape)


def deinterleave_qkv(x: np.ndarray, n_head: int, n_head_kv: int, head_dim: int) -> np.ndarray:
    """Fused Wqkv weight [(H+2Hkv)*hd, d] or bias [(H+2Hkv)*hd]: Q and K head blocks to
    stripe-major order, V untouched (it is consumed as consecutive head pairs)."""
    nq, nk = n_head * head_dim, n_head_kv * head_dim
    if x.shape[0] != nq + 2 * nk:
        raise ValueError(f"Wqkv has {x.shape[0]} rows, expected {nq + 2 * nk}")
    q = _permute_heads(x[:nq], n_head, head_dim)
    k = _permute_heads(x[nq : nq + nk], n_head_kv, head_dim)
    return np.ascontiguousarray(np.concatenate([q, k, x[nq + nk :]], axis=0))


def deinterleave_q(x: np.ndarray, n_head: int, head_dim: int) -> np.ndarray:
    """Cross layers' Q-only Wqkv weight [H*hd, d] or bias [H*hd]: heads to stripe-major order."""
    if x.shape[0] != n_head * head_dim:
        raise ValueError(f"Wq has {x.shape[0]} rows, expected {n_head * head_dim}")
    return np.ascontiguousarray(_permute_heads(x, n_head, head_dim))


# --------------------------------------------------------------------------------------------
# differential-attention λ (folded into metadata, spec §5.6)


def lambda_init(layer: int) -> float:
    """λ_init(l) = 0.8 - 0.6·exp(-0.3·l), l the global 0-based layer index."""
    return float(_lambda_init(layer))


def _lambda_init(layer: int) -> decimal.Decimal:
    # in decimal (software arithmetic, correctly rounded exp): the same value on every platform,
    # where math.exp may differ in the last bit between C libraries
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        return decimal.Decimal("0.8") - decimal.Decimal("0.6") * (decimal.Decimal("-0.3") * layer).exp()


def fold_lambda(
    q1: np.ndarray, k1: np.ndarray, q2: np.ndarray, k2: np.ndarray, layer: int
) -> float:
    """λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init(l) (the four vectors are [hd]).

    The same value on every platform: the dot products and exps run in Python's ``decimal``
    (software arithmetic, exp correctly rounded, no BLAS summation order), and the result is
    rounded once to float64 (the GGUF stores it as float32).
    """
    vecs = [np.asarray(v, dtype=np.float64).reshape(-1).tolist() for v in (q1, k1, q2, k2)]
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal
        dot1, dot2 = (sum((d(a) * d(b) for a, b in zip(u, w)), d(0))
                      for u, w in ((vecs[0], vecs[1]), (vecs[2], vecs[3])))
        return float(dot1.exp() - dot2.exp() + _lambda_init(layer))
