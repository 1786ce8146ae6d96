"""sambay.sampling: llama.cpp's penalty and truncation semantics, seeding, validation."""

from __future__ import annotations

import numpy as np
import pytest

from sambay.sampling import (SamplingParams, apply_penalties, candidates, log_softmax,
                             make_rng, sample)


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    p = SamplingParams(temperature=0.0)
    assert all(sample(logits, p, make_rng(s)) == 1 for s in range(5))


def test_penalties_match_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    p = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.3)
    out = apply_penalties(logits, [0, 1, 0, 3, 0], p)
    # token 0 seen 3x: 2/2 - 3*0.1 - 0.3; token 1 seen once: -2*2 - 0.1 - 0.3
    np.testing.assert_allclose(out, [1.0 - 0.6, -4.0 - 0.4, 1.0, 0.25 - 0.4], rtol=1e-6)
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, 0.5])  # input untouched
    # only the last penalty_last_n tokens count
    p2 = SamplingParams(repeat_penalty=2.0, penalty_last_n=2)
    np.testing.assert_allclose(apply_penalties(logits, [0, 0, 2, 3], p2), [2.0, -2.0, 0.5, 0.25])


def test_top_k_top_p_min_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    assert list(candidates(logits, SamplingParams(top_k=2, top_p=1.0, min_p=0.0))) == [0, 1]
    # cumulative 0.5, 0.7, 0.85: top_p 0.8 keeps 3
    assert list(candidates(logits, SamplingParams(top_k=0, top_p=0.8, min_p=0.0))) == [0, 1, 2]
    # min_p 0.25 keeps p >= 0.125
    assert list(candidates(logits, SamplingParams(top_k=0, top_p=1.0, min_p=0.25))) == [0, 1, 2]
    assert list(candidates(logits, SamplingParams(top_k=0, top_p=0.0, min_p=0.0))) == [0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = [sample(logits, p, r) for r in [make_rng(7)] for _ in range(50)]
    b = [sample(logits, p, r) for r in [make_rng(7)] for _ in range(50)]
    assert a == b
    # empirical frequencies over a small vocabulary match softmax
    small = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    r = make_rng(1)
    draws = np.bincount([sample(small, p, r) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, np.exp(log_softmax(small)), atol=0.03)
    # temperature sharpens
    cold = SamplingParams(temperature=0.25, top_k=0, top_p=1.0, min_p=0.0)
    draws = np.bincount([sample(small, cold, r) for _ in range(2000)], minlength=3) / 2000
    assert draws[2] > 0.95


@pytest.mark.parametrize("kwargs", [
    {"temperature": float("nan")}, {"top_p": 1.5}, {"min_p": -0.1}, {"repeat_penalty": 0.0},
    {"top_k": 2.5}, {"frequency_penalty": float("inf")}, {"penalty_last_n": -1},
])
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_log_softmax():
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = log_softmax(x)
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], np.log(1 / 3), rtol=1e-6)


def test_native_top_k_matches_a_stable_sort():
    from sambay._native import _core

    rng = np.random.default_rng(3)
    for n, k in [(200064, 40), (1000, 1), (50, 50), (50, 80), (7, 0)]:
        x = rng.standard_normal(n).astype(np.float32)
        x[::5] = x[0]  # ties break by lower index
        got = _core.top_k_indices(x, k)
        assert list(got) == list(np.argsort(-x, kind="stable")[: min(k, n)])
    x = np.array([1.0, np.nan, 3.0], dtype=np.float32)
    assert list(_core.top_k_indices(x, 2)) == [2, 0]  # NaN ranks last
    with pytest.raises(ValueError):
        _core.top_k_indices(np.zeros((2, 2), dtype=np.float32), 1)


def test_min_p_prefilter_without_top_k_matches_the_definition():
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal(5000) * 3).astype(np.float32)
    p = SamplingParams(top_k=0, top_p=0.9, min_p=0.02)
    got = candidates(logits, p)
    # by definition: sort all, softmax, top-p then min-p on the temperature-1 distribution
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order].astype(np.float64) - logits[order[0]])
    probs /= probs.sum()
    n = int(np.searchsorted(np.cumsum(probs), 0.9)) + 1
    n = min(n, int(np.count_nonzero(probs >= 0.02 * probs[0])))
    assert list(got) == list(order[:n])


def test_typical_p_matches_llama_cpp():
    # p 0.5 .2 .15 .1 .05: entropy 1.333 nats; |surprise - entropy| orders the tokens 1, 2, 0, 3, 4
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    keep = lambda typical, **kw: list(candidates(logits, SamplingParams(  # noqa: E731
        top_k=kw.get("top_k", 0), top_p=1.0, min_p=0.0, typical_p=typical)))
    assert keep(0.1) == [1]  # at least one
    assert keep(0.3) == [1, 2]  # 0.2 + 0.15 > 0.3
    assert keep(0.5) == [0, 1, 2]  # 0.2 + 0.15 + 0.5 > 0.5, most likely first again
    assert keep(1.0) == [0, 1, 2, 3, 4]
    # after top-k the distribution is that of the k kept (p .5/.7, .2/.7: entropy 0.598 nats)
    assert keep(0.5, top_k=2) == [0]
    with pytest.raises(ValueError, match="typical_p"):
        SamplingParams(typical_p=1.5)


def test_mirostat_2_truncates_by_surprise_and_learns_mu():
    from sambay.sampling import MirostatState

    logits = np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))
    # tau tiny: mu = 2 tau keeps no token's surprise, so the most likely one (at least one kept)
    p = SamplingParams(mirostat=2, mirostat_tau=0.01, temperature=1.0)
    assert {sample(logits, p, make_rng(s), mirostat=MirostatState(p)) for s in range(20)} == {0}
    # mu 2 bits keeps surprise <= 2 (p >= 0.25): tokens 0 and 1, renormalised to 2/3 and 1/3
    p = SamplingParams(mirostat=2, mirostat_tau=1.0, mirostat_eta=0.5, temperature=1.0)
    state = MirostatState(p)
    assert state.mu == 2.0
    t = sample(logits, p, make_rng(0), mirostat=state)
    assert t in (0, 1)
    surprise = -np.log2({0: 2 / 3, 1: 1 / 3}[t])
    assert state.mu == pytest.approx(2.0 - 0.5 * (surprise - 1.0))
    with pytest.raises(ValueError, match="MirostatState"):
        sample(logits, p, make_rng(0))
    with pytest.raises(ValueError, match="mirostat"):
        SamplingParams(mirostat=3)


def test_mirostat_1_keeps_the_zipf_top_k():
    from sambay.sampling import MirostatState

    # Zipf with exponent 1.5: s_hat = 1.5, k = (0.5 * 2**mu) ** (1 / 1.5) = 64 for mu = 10
    n = 1000
    logits = (-1.5 * np.log(np.arange(1, n + 1))).astype(np.float32)
    p = SamplingParams(mirostat=1, mirostat_tau=5.0, temperature=1.0)
    draws = [sample(logits, p, make_rng(s), mirostat=MirostatState(p)) for s in range(400)]
    assert max(draws) < 64 and max(draws) > 16
