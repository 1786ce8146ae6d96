"""The thread count chooser (csrc/threads.h, bound as ``_core.ThreadTuner``) fed with synthetic
step times, and the engine's adaptive mode against fixed counts (same greedy tokens and logits)."""

from __future__ import annotations

import numpy as np
import pytest

from sambay._native import _core
from sambay.engine import Context, Model

TOKENS = 1  # tokens per synthetic step (the tuner compares seconds per token)


def drive(tuner, seconds_per_token, steps, start=0):
    """Runs ``steps`` synthetic steps; ``seconds_per_token(step, n)`` is the time of a step with
    n threads. Returns the counts used, step by step."""
    used = []
    for step in range(start, start + steps):
        n = tuner.next()
        used.append(n)
        tuner.record(n, seconds_per_token(step, n) * TOKENS, TOKENS)
    return used


def test_switches_down_when_the_probe_is_faster():
    # a busy machine: one thread twice as fast as two
    t = _core.ThreadTuner(2)
    assert t.adaptive and t.current == 2
    used = drive(t, lambda _s, n: {1: 0.5, 2: 1.0}[n], 300)
    assert used[:12].count(1) >= 4, "the switch comes within the first probes"
    assert t.current == 1 and t.switches == 1
    assert used[-200:].count(2) <= 6  # it stays there: rare probes back to 2, 2 steps each


def test_stays_when_the_probe_is_slower_and_backs_off():
    # an idle machine: two threads faster
    t = _core.ThreadTuner(2)
    used = drive(t, lambda _s, n: {1: 1.5, 2: 1.0}[n], 1000)
    assert t.current == 2 and t.switches == 0
    # waits double (4, 8, ... 1024 steps; at least 16·1.5): a few probes of 2 steps in 1000
    assert 3 <= t.probes <= 10
    assert used.count(1) == 2 * t.probes


def test_a_small_gain_is_not_a_switch():
    # within the 10% margin: noise, not a reason to move
    t = _core.ThreadTuner(2)
    drive(t, lambda _s, n: {1: 0.95, 2: 1.0}[n], 300)
    assert t.current == 2 and t.switches == 0


def test_reprobes_at_once_after_a_slowdown():
    # idle for 600 steps (the wait has grown long), then other programs take the cores
    def times(step, n):
        if step < 600:
            return {1: 1.5, 2: 1.0}[n]
        return {1: 1.6, 2: 5.0}[n]

    t = _core.ThreadTuner(2)
    drive(t, times, 600)
    assert t.current == 2
    # three slow steps in a row, then at once the probe (2 steps) that wins
    assert drive(t, times, 5, start=600) == [2, 2, 2, 1, 1]
    assert t.current == 1, "steps 5x slower than the average must trigger a probe, not wait ~1024 steps"


def test_a_lone_slow_step_is_noise():
    # one step in 20 is 3x slower (another program's burst): no probe comes from it; the waits
    # keep doubling as when every step takes the same time
    def noisy(step, n):
        return {1: 1.5, 2: 1.0}[n] * (3.0 if step % 20 == 0 else 1.0)

    quiet, busy = _core.ThreadTuner(2), _core.ThreadTuner(2)
    drive(quiet, lambda _s, n: {1: 1.5, 2: 1.0}[n], 1000)
    drive(busy, noisy, 1000)
    assert busy.current == 2 and busy.probes == quiet.probes


def test_a_hopeless_probe_ends_after_one_step():
    # one thread, the best on busy cores; two threads 4x slower: a probe costs one step
    t = _core.ThreadTuner(2)
    used = drive(t, lambda _s, n: {1: 1.0, 2: 4.0}[n], 400)
    first = used.index(1)  # the first probe (from 2 down) wins: after it every 2 is a probe
    assert t.current == 1 and t.probes >= 4 and used[first:].count(2) == t.probes - 1
    # and such a probe waits at least 16·4 steps: failed probes take under a tenth of the time
    assert sum({1: 1.0, 2: 4.0}[n] for n in used[first:] if n == 2) < 0.1 * sum(
        {1: 1.0, 2: 4.0}[n] for n in used[first:])



def test_returns_to_more_threads_when_the_cores_free_up():
    def times(step, n):
        return {1: 0.5, 2: 1.0}[n] if step < 100 else {1: 1.0, 2: 0.5}[n]

    t = _core.ThreadTuner(2)
    drive(t, times, 100)
    assert t.current == 1
    drive(t, times, 1500, start=100)  # found by the periodic probe (at most the longest wait)
    assert t.current == 2


def test_never_leaves_one_to_n_max_and_climbs_to_the_best():
    # more threads always faster: from the top it probes down, sees slower, and stays
    t = _core.ThreadTuner(3)
    used = drive(t, lambda _s, n: 1.0 / n, 2000)
    assert set(used) <= {1, 2, 3} and t.current == 3
    # best in the middle: 4 usable cores, 2 threads fastest
    t = _core.ThreadTuner(4)
    used = drive(t, lambda _s, n: {1: 2.0, 2: 1.0, 3: 1.5, 4: 3.0}[n], 500)
    assert set(used) <= {1, 2, 3, 4} and t.current == 2


def test_one_core_never_probes():
    t = _core.ThreadTuner(1)
    assert drive(t, lambda _s, n: 1.0, 100) == [1] * 100 and t.probes == 0


def test_a_fixed_count_never_changes():
    t = _core.ThreadTuner(4, 3)
    assert not t.adaptive
    used = drive(t, lambda s, n: 10.0 if s % 7 == 0 else 1.0 * n, 500)
    assert used == [3] * 500 and t.current == 3 and t.probes == 0 and t.switches == 0


def test_the_first_step_is_not_used():
    # a slow first step (page faults) must not make the second look like a gain
    t = _core.ThreadTuner(2)
    drive(t, lambda s, n: 100.0 if s == 0 else {1: 1.05, 2: 1.0}[n], 200)
    assert t.switches == 0


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="n_max"):
        _core.ThreadTuner(0)
    with pytest.raises(ValueError, match="n_fixed"):
        _core.ThreadTuner(2, 3)


def test_bound_is_the_usable_cores(gguf_path):
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _core.usable_cores() == cores
    c = Context(Model(gguf_path), n_ctx=16)
    for kind in ("decode", "batch"):
        assert c.threads[kind] == {"adaptive": True, "current": cores, "n_max": cores, "probes": 0, "switches": 0}
    fixed = Context(Model(gguf_path), n_ctx=16, n_threads=3, n_threads_batch=0)
    assert fixed.threads["decode"]["current"] == fixed.n_threads == 3  # exactly N, even above the cores
    assert fixed.n_threads_batch == cores and not fixed.threads["batch"]["adaptive"]
    with pytest.raises(ValueError, match="n_threads must be None"):
        Context(Model(gguf_path), n_ctx=16, n_threads=-1)


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf):
    return tiny_gguf("tiny-8")[1]


def _greedy(ctx, prompt, n):
    logits = [ctx.eval(prompt)[-1]]
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(ctx.eval([tokens[-1]])[-1])
    return tokens, np.stack(logits)


@pytest.mark.skipif(_core.usable_cores() < 2, reason="one usable core: the auto mode has nothing to choose")
def test_auto_decodes_as_fixed_counts(tiny_gguf):
    _, path = tiny_gguf("tiny-12")
    model = Model(path)
    prompt = list(np.random.default_rng(3).integers(1, model.n_vocab, 32))
    runs = {}
    # 8 prompt steps and 10 decode steps: each kind reaches its first probe (a step at a count other
    # than its first) whatever the timings; fixed two threads: test_engine.py
    for name, kw in {"one": dict(n_threads=1, n_threads_batch=1), "auto": {}}.items():
        ctx = Context(model, n_ctx=64, n_batch=4, **kw)
        runs[name] = _greedy(ctx, prompt, 10)
        if name == "auto":
            assert ctx.threads["decode"]["probes"] >= 1 and ctx.threads["batch"]["probes"] >= 1
    assert runs["auto"][0] == runs["one"][0]
    np.testing.assert_allclose(runs["auto"][1], runs["one"][1], rtol=0, atol=1e-5)


def test_llama_shows_the_choice(gguf_path):
    from sambay import Llama

    with Llama(gguf_path, n_ctx=32, n_threads=1, verbose=False) as llm:
        assert llm.threads["decode"]["current"] == 1 and not llm.threads["decode"]["adaptive"]
        assert llm.threads["batch"]["adaptive"]  # n_threads_batch not given: adapted
    with Llama(gguf_path, n_ctx=32, n_seq_max=2, verbose=False) as llm:  # through the shared context
        assert llm.threads["decode"]["adaptive"] and llm.threads["decode"]["n_max"] == _core.usable_cores()
