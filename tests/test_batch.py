"""Many sequences in one context (``n_seq_max``): every sequence's logits in a batched decode
equal its own single-sequence run, across prompt lengths, the sliding-window boundary,
sequences joining and leaving at different steps, non-adjacent slots, both attention paths and
the per-sequence operations (reset, state save/load, context full).

The single-sequence engine is checked against the reference model in test_engine.py; here the
batched engine is checked against the single-sequence one (f32 weights and KV: 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import make_gguf
from sambay.engine import Context, ContextFullError, Model, StateError

ATOL = 1e-4
N_CTX = 128
THREADS = dict(n_threads=1, n_threads_batch=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("batch")


@pytest.fixture(scope="module", params=["tiny-12", "tiny-8"])
def model(request, tiny_gguf):
    _, path = tiny_gguf(request.param)
    return Model(path)


def _ids(n, n_vocab, seed):
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def _ctx(model, **kw):
    args = dict(n_ctx=N_CTX, kv_type="f32", **THREADS)
    args.update(kw)
    return Context(model, **args)


def _alone(model, prompt, steps, **kw):
    """Logits rows of one sequence run alone: the prompt, then one token per step."""
    c = _ctx(model, **kw)
    rows = [c.eval(prompt)]
    rows += [c.eval([t]) for t in steps]
    return np.concatenate(rows)


def _schedule(model, plan, **kw):
    """Runs `plan` (slot -> (join step, prompt, decode tokens)) batched in one context: at each
    step every joined sequence sends its next input (its prompt at its join step, then one
    token), all in one decode() call. Returns slot -> logits rows, in order."""
    n_seq = max(plan) + 1
    c = _ctx(model, n_seq_max=n_seq, **kw)
    out = {s: [] for s in plan}
    last = max(j + len(toks) for j, _, toks in plan.values())
    for step in range(last + 1):
        batch = []
        for s, (join, prompt, toks) in plan.items():
            if step == join:
                batch.append((s, prompt))
            elif join < step <= join + len(toks):
                batch.append((s, [toks[step - join - 1]]))
        if not batch:
            continue
        logits = c.decode(batch)
        r = 0
        for s, tokens in batch:
            n = len(tokens) if c.logits_all else 1
            out[s].append(logits[r:r + n])
            r += n
        assert r == logits.shape[0]
    for s, (join, prompt, toks) in plan.items():
        assert c.seq_n_past(s) == len(prompt) + len(toks)
    return {s: np.concatenate(v) for s, v in out.items()}


def _plan(model, seed=0):
    W = model.hparams()["n_swa"]
    v = model.n_vocab
    lens = {0: 1, 3: W - 1, 1: W + 3, 5: 3 * W + 5, 2: 5}  # non-adjacent slots, mixed lengths
    joins = {0: 0, 3: 0, 1: 2, 5: 4, 2: 9}
    steps = {0: 2 * W + 3, 3: 20, 1: 8, 5: 2 * W, 2: 12}  # some leave early
    return {s: (joins[s], _ids(lens[s], v, seed + 10 * s), _ids(steps[s], v, seed + 10 * s + 1)) for s in lens}


@pytest.mark.parametrize("n_batch", [512, 7])
def test_batched_logits_equal_single_sequence_runs(model, n_batch):
    plan = _plan(model)
    got = _schedule(model, plan, n_batch=n_batch)
    for s, (_, prompt, toks) in plan.items():
        want = _alone(model, prompt, toks, n_batch=n_batch)
        assert got[s].shape == want.shape
        err = np.abs(got[s] - want).max()
        assert err < ATOL, f"slot {s}: max |batched - alone| = {err:.3g}"


def test_batched_logits_all_and_flash_attention(model):
    plan = _plan(model, seed=1)
    for kw in (dict(logits_all=True), dict(flash_attn=True)):
        got = _schedule(model, plan, n_batch=9, **kw)
        for s, (_, prompt, toks) in plan.items():
            want = _alone(model, prompt, toks, n_batch=9, **kw)
            assert got[s].shape == want.shape
            err = np.abs(got[s] - want).max()
            assert err < ATOL, f"{kw}, slot {s}: max |batched - alone| = {err:.3g}"


def test_comparison_detects_a_mixed_up_sequence(model):
    # negative control: the same bound fails when a sequence's logits are compared with those
    # of another sequence fed the same decode tokens (so the check above can fail)
    plan = _plan(model)
    got = _schedule(model, plan)
    _, prompt, toks = plan[1]
    other = _alone(model, plan[3][1], toks)
    assert np.abs(got[1] - other).max() > 100 * ATOL
    assert np.abs(got[1] - _alone(model, prompt, toks)).max() < ATOL


def test_greedy_continuations_identical(model):
    v, W = model.n_vocab, model.hparams()["n_swa"]
    prompts = [_ids(n, v, 100 + n) for n in (3, W + 1, 2 * W + 2, 1)]
    n_steps = 2 * W + 4

    def greedy_alone(prompt):
        c = _ctx(model)
        tok = int(np.argmax(c.eval(prompt)[-1]))
        out = [tok]
        for _ in range(n_steps - 1):
            tok = int(np.argmax(c.eval([tok])[-1]))
            out.append(tok)
        return out

    c = _ctx(model, n_seq_max=len(prompts))
    logits = c.decode(list(enumerate(prompts)))
    toks = [int(np.argmax(row)) for row in logits]
    got = [[t] for t in toks]
    for _ in range(n_steps - 1):
        logits = c.decode([(s, [t]) for s, t in enumerate(toks)])
        toks = [int(np.argmax(row)) for row in logits]
        for s, t in enumerate(toks):
            got[s].append(t)
    for s, prompt in enumerate(prompts):
        assert got[s] == greedy_alone(prompt), f"sequence {s}"


def test_quantized_weights_batched_equal_single(root):
    # quantized matmuls may take other kernels for several columns; still one model's logits
    from sambay.quantization import quantize

    _, f32 = make_gguf(root, "tiny-12", "f32")
    q = root / "tiny-12-q4_0.gguf"
    quantize(f32, q, "Q4_0", n_threads=1, progress=False)
    model = Model(q)
    plan = _plan(model, seed=2)
    got = _schedule(model, plan)
    for s, (_, prompt, toks) in plan.items():
        want = _alone(model, prompt, toks)
        err = np.abs(got[s] - want).max()
        assert err < ATOL, f"slot {s}: max |batched - alone| = {err:.3g}"


def test_state_of_one_sequence_moves_to_another_slot_and_context(model):
    v = model.n_vocab
    a, b, cont = _ids(20, v, 1), _ids(33, v, 2), _ids(10, v, 3)
    c = _ctx(model, n_seq_max=3)
    c.decode([(0, a), (2, b)])
    state = c.save_state(seq=2)
    assert c.save_state(2) != c.save_state(0)
    # into slot 1 of the same context and slot 0 of a single-sequence one
    c.load_state(state, seq=1)
    assert c.seq_n_past(1) == 33 and c.seq_n_past(2) == 33 and c.seq_n_past(0) == 20
    single = _ctx(model)
    single.load_state(state)
    got = c.decode([(1, cont), (2, cont), (0, cont)])
    want = single.eval(cont)
    assert np.abs(got[0] - want[0]).max() < ATOL
    assert np.abs(got[1] - want[0]).max() < ATOL
    assert np.abs(got[2] - _alone(model, a + cont, [])[-1]).max() < ATOL


def test_reset_one_sequence_leaves_the_others(model):
    v = model.n_vocab
    a, b, c2 = _ids(18, v, 4), _ids(25, v, 5), _ids(7, v, 6)
    c = _ctx(model, n_seq_max=2)
    c.decode([(0, a), (1, b)])
    c.seq_reset(0)
    assert c.seq_n_past(0) == 0 and c.seq_n_past(1) == 25
    got = c.decode([(0, c2), (1, c2)])
    assert np.abs(got[0] - _alone(model, c2, [])[-1]).max() < ATOL
    assert np.abs(got[1] - _alone(model, b + c2, [])[-1]).max() < ATOL


def test_context_full_names_the_sequence_and_computes_nothing(model):
    v = model.n_vocab
    c = _ctx(model, n_seq_max=3, n_ctx=32)
    c.decode([(0, _ids(10, v, 7)), (2, _ids(30, v, 8))])
    with pytest.raises(ContextFullError) as e:
        c.decode([(0, [1]), (2, [1, 2, 3])])
    assert e.value.seq_id == 2 and e.value.n_requested == 33 and e.value.n_ctx == 32
    assert "sequence 2" in str(e.value)
    assert c.seq_n_past(0) == 10 and c.seq_n_past(2) == 30  # nothing evaluated
    c.decode([(0, [1]), (2, [1, 2])])  # the others go on
    assert c.seq_n_past(0) == 11 and c.seq_n_past(2) == 32


def test_bad_sequence_ids(model):
    c = _ctx(model, n_seq_max=2)
    with pytest.raises(ValueError, match="out of range"):
        c.decode([(2, [1])])
    with pytest.raises(ValueError, match="twice"):
        c.decode([(1, [1]), (1, [2])])
    with pytest.raises(ValueError, match="out of range"):
        c.seq_reset(5)
    with pytest.raises(ValueError, match="n_seq_max"):
        _ctx(model, n_seq_max=0)
    with pytest.raises(ValueError, match="invalid token id"):
        c.decode([(0, [1]), (1, [model.n_vocab])])
    assert c.seq_n_past(0) == 0 and c.seq_n_past(1) == 0
    with pytest.raises(StateError):
        c.load_state(b"nonsense", seq=1)


def test_memory_per_sequence(model):
    one = _ctx(model).memory_breakdown()
    many = _ctx(model, n_seq_max=4).memory_breakdown()
    caches = ("mamba_conv", "mamba_ssm", "swa_kv", "full_kv")
    assert many["n_seq_max"] == 4 and one["n_seq_max"] == 1
    assert many["per_sequence"] == one["per_sequence"] == sum(one[k] for k in caches)
    for k in caches:
        assert many[k] == 4 * one[k]


@pytest.mark.parametrize("n_batch", [512, 5])
def test_decode_steps_on_consecutive_slots_equal_single_runs(model, n_batch):
    # every sequence decoding one token on slots 0..S-1: the attention of all of them runs as
    # one batched product over a view of their cells (other depths padded and masked)
    W, v = model.hparams()["n_swa"], model.n_vocab
    lens = [1, W - 1, W + 2, 3 * W + 5]
    plan = {s: (0, _ids(n, v, 50 + s), _ids(2 * W + 3, v, 60 + s)) for s, n in enumerate(lens)}
    got = _schedule(model, plan, n_batch=n_batch)
    for s, (_, prompt, toks) in plan.items():
        err = np.abs(got[s] - _alone(model, prompt, toks, n_batch=n_batch)).max()
        assert err < ATOL, f"slot {s}: max |batched - alone| = {err:.3g}"
