"""The converter's float math gives the same bytes on every platform (no torch needed).

float32 ``np.exp`` is not correctly rounded and its last bit differs between NumPy's x86 SIMD
code and its aarch64 code (789 of 2048 values of one demo-model A tensor differed), which made
the shipped demo GGUF unreproducible on a Raspberry Pi. ``A = -exp(A_log)`` must be the
correctly rounded float32 (a value every platform agrees on), and λ must not depend on BLAS's
summation order or on the C library's ``exp``.
"""

from __future__ import annotations

import decimal

import numpy as np
import pytest
from sambay.convert import transforms

# float32 inputs (bit patterns) whose exp lies within 2^-44 (relative) of a point halfway
# between two float32 values: float64 exp alone cannot tell which way they round. Found by
# scanning every float32 in [0.5, 3); the nearer neighbour is sometimes below, sometimes above.
NEAR_TIES = [0x3F0D642E, 0x3F5BC24C, 0x3F76527B, 0x3FA79EE2, 0x4003E87F, 0x40264C6C, 0x40354518]


def _correctly_rounded_neg_exp(x: np.float32) -> np.float32:
    """The float32 nearest to -exp(x), by brute force: exp to 60 digits, then whichever of
    three adjacent float32 candidates is nearest (exact decimal comparisons)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        e = decimal.Decimal(float(x)).exp()
        c = np.float32(float(e))
        cands = [np.nextafter(c, np.float32(0)), c, np.nextafter(c, np.float32(np.inf))]
        return -min(cands, key=lambda v: abs(decimal.Decimal(float(v)) - e))


def _a_log_like(seed: int = 0) -> np.ndarray:
    # Mamba's init: log(1..d_state) per row, plus noise (convert/tiny.py draws the same way)
    rng = np.random.default_rng(seed)
    return (np.log(np.arange(1, 17))[None, :] + 0.1 * rng.standard_normal((128, 16))).astype(np.float32)


def test_neg_exp_is_the_correctly_rounded_float32():
    a_log = _a_log_like()
    got = transforms.neg_exp(a_log)
    assert got.dtype == np.float32 and got.shape == a_log.shape
    want = np.array([_correctly_rounded_neg_exp(v) for v in a_log.ravel()]).reshape(a_log.shape)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} values differ"


def test_near_ties_are_settled_exactly():
    x = np.array(NEAR_TIES, dtype=np.uint32).view(np.float32)
    y = np.exp(x.astype(np.float64))
    w = transforms._F32_TIE_WINDOW
    # these really are values float64 cannot decide: the decimal branch runs for each
    assert ((y * (1 - w)).astype(np.float32) != (y * (1 + w)).astype(np.float32)).all()
    want = np.array([_correctly_rounded_neg_exp(v) for v in x])
    assert np.array_equal(transforms.neg_exp(x), want)


@pytest.mark.parametrize("ulps", [-8, -1, 1, 8])
def test_neg_exp_does_not_depend_on_the_platforms_float64_exp(monkeypatch, ulps):
    """Another platform's float64 exp may be a few ulps off this one's: same bytes."""
    x = np.concatenate([_a_log_like(1).ravel(), np.array(NEAR_TIES, dtype=np.uint32).view(np.float32)])
    want = transforms.neg_exp(x)

    class _OtherNumpy:  # numpy, with exp off by `ulps` float64 ulps
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def exp(v):
            return np.exp(v) * (1 + ulps * 2.0**-52)

    monkeypatch.setattr(transforms, "np", _OtherNumpy())
    assert np.array_equal(transforms.neg_exp(x), want)


def test_fold_lambda_does_not_depend_on_summation_order():
    """A BLAS float64 dot sums in an order that depends on the CPU; λ must not."""
    rng = np.random.default_rng(3)
    vecs = [rng.standard_normal(64).astype(np.float32) * 0.3 for _ in range(4)]
    lam = transforms.fold_lambda(*vecs, layer=5)
    for seed in range(20):
        perm = np.random.default_rng(seed).permutation(64)
        assert transforms.fold_lambda(*(v[perm] for v in vecs), layer=5) == lam, seed
    # and it is the formula: exp(q1·k1) - exp(q2·k2) + λ_init(5), to float64 rounding
    f64 = [v.astype(np.float64) for v in vecs]
    want = np.exp(f64[0] @ f64[1]) - np.exp(f64[2] @ f64[3]) + transforms.lambda_init(5)
    assert lam == pytest.approx(want, rel=1e-14, abs=1e-15)


def test_lambda_init_table():
    # λ_init(l) = 0.8 - 0.6·exp(-0.3·l); the decimal computation is this value rounded once
    for layer in range(32):
        assert transforms.lambda_init(layer) == pytest.approx(0.8 - 0.6 * np.exp(-0.3 * layer), rel=1e-15)
