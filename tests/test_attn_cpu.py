"""The CPU attention kernel of decode-sized batches (csrc/attn_cpu.*): every logits row equals
ggml's mul_mat path (SAMBAY_CPU_ATTN=0) and the float64 reference, for every KV type, n_batch 1
to 16, several sequences of different lengths in one context, across the sliding-window
boundary, for head sizes that take the SIMD loop and one that takes the scalar loop, and for 1,
2 and 4 query heads per K head; the scalar loop (SAMBAY_ATTN_SIMD=0) equals the SIMD one.
The sequences of a micro-batch with at most 16 rows each share one set of kernel ops per layer
(the joined path): sequences in scattered slots joining and leaving at different steps, with 1
to 16 rows each, next to a longer chunk that takes the per-sequence path, equal ggml's path and
the reference; a decode step of several sequences has as many attention nodes as one of a
single sequence."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import reference_logits, three_sequences
from numpy_reference import NumpyReference
from sambay import _core
from sambay.engine import Context, Model

N_CTX = 96
THREADS = dict(n_threads=2, n_threads_batch=2)
# a differential-attention head shape per case: (name, overrides); tiny-12 has 8 heads of 32
SHAPES = {
    "g2-hd32": {},                                        # 2 query heads per K head (the real model's)
    "g1-hd32": {"num_key_value_heads": 8},
    "g4-hd32": {"num_key_value_heads": 2},
    "g2-hd64": {"num_attention_heads": 4, "num_key_value_heads": 2},  # the real model's head size
    "g2-hd12": {"hidden_size": 96},                       # not a multiple of the SIMD width: scalar loop
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from sambay.convert import convert, tiny

    root = tmp_path_factory.mktemp("attn_cpu")
    out = {}
    for name, overrides in SHAPES.items():
        hf = tiny.write_checkpoint(root / name, "tiny-12", seed=3, overrides=overrides)
        path = root / f"{name}.gguf"
        convert(hf, path, outtype="f32", progress=False)
        out[name] = (hf, Model(path))
    return out


def _run(model, monkeypatch, *, cpu_attn, kv_type="f32", n_batch=16, simd=True):
    """Three sequences in one context: prompts of 3, 21 and 40 tokens (the window is 16), fed in
    n_batch chunks together, then 24 decode steps of all three. Returns slot -> logits rows
    (the last row of each prompt chunk, then one row per step)."""
    monkeypatch.setenv("SAMBAY_CPU_ATTN", "1" if cpu_attn else "0")
    monkeypatch.setenv("SAMBAY_ATTN_SIMD", "1" if simd else "0")
    c = Context(model, n_ctx=N_CTX, n_batch=n_batch, n_seq_max=3, kv_type=kv_type, **THREADS)
    return three_sequences(c, model.n_vocab, seed=7, n_steps=24, n_batch=n_batch)


def _max_diff(a, b):
    return max(np.abs(a[s] - b[s]).max() for s in a)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_equals_mul_mat_path_and_reference(shapes, shape, monkeypatch):
    hf, model = shapes[shape]
    new, prompts, steps = _run(model, monkeypatch, cpu_attn=True)
    old, _, _ = _run(model, monkeypatch, cpu_attn=False)
    assert _max_diff(new, old) < 1e-4
    # the last rows of sequence 2 against the float64 reference (prompt, then its decode tokens)
    ref = NumpyReference.from_folder(hf)
    ids = prompts[2] + [row[2] for row in steps]
    want = reference_logits(ref, ids)[len(prompts[2]) - 1:]
    err = np.abs(new[2][-len(want):] - want).max()
    assert err < 1e-4, f"max |kernel - reference| = {err:.3g}"


@pytest.mark.parametrize("n_batch", [1, 2, 5, 16])
def test_every_micro_batch_size(shapes, n_batch, monkeypatch):
    _, model = shapes["g2-hd32"]
    new, _, _ = _run(model, monkeypatch, cpu_attn=True, n_batch=n_batch)
    old, _, _ = _run(model, monkeypatch, cpu_attn=False, n_batch=n_batch)
    assert _max_diff(new, old) < 1e-4


@pytest.mark.parametrize("shape, kv_type, atol", [("g2-hd64", "f16", 1.5e-3), ("g2-hd64", "bf16", 1e-2),
                                                  ("g1-hd32", "f16", 1.5e-3), ("g4-hd32", "f16", 1.5e-3)])
def test_half_precision_caches(shapes, shape, kv_type, atol, monkeypatch):
    # the kernel scores with F32 queries where ggml's path rounds them to the cache type: both
    # stay within the cache type's tolerance of the f32 cache's logits. F16 keys are scored two
    # queries at a time: one query head per K head leaves an odd one out in rows of 3 (g1)
    _, model = shapes[shape]
    exact, _, _ = _run(model, monkeypatch, cpu_attn=True, kv_type="f32")
    new, _, _ = _run(model, monkeypatch, cpu_attn=True, kv_type=kv_type)
    old, _, _ = _run(model, monkeypatch, cpu_attn=False, kv_type=kv_type)
    assert _max_diff(new, exact) < atol
    assert _max_diff(old, exact) < atol
    assert _max_diff(new, old) < atol


def test_scalar_loop_equals_simd_loop(shapes, monkeypatch):
    _, model = shapes["g2-hd64"]
    simd, _, _ = _run(model, monkeypatch, cpu_attn=True)
    scalar, _, _ = _run(model, monkeypatch, cpu_attn=True, simd=False)
    assert _max_diff(simd, scalar) < 1e-5


def test_system_info_names_the_kernel():
    import platform

    want = {"x86_64": {"avx2", "scalar"}, "aarch64": {"neon"}, "arm64": {"neon"}}.get(platform.machine(), {"scalar"})
    assert _core.system_info()["attn_kernel"] in want


# (slot -> tokens fed) per decode call: slots 3, 0 and 2 of a 4-slot context start and stop at
# different calls, slot 1 joins at the last two; 1 to 16 rows per sequence, and 17, 20 and 30
# rows (chunks longer than the joined path takes) next to joined sequences; the window (16) is
# crossed. The last two calls join slots 0 (81 cells), 1 (1 cell) and 3 (30 cells): too far
# apart to pad slot 1 to slot 0's depth, so slots 0 and 3 share a join and slot 1 (between them
# in row order) gets its own
PLAN = (
    {3: 5},
    {3: 1, 0: 16},
    {3: 1, 0: 1, 2: 7},
    {0: 1, 2: 1},
    {3: 16, 0: 3, 2: 1},
    {3: 1, 0: 17, 2: 2},
    {3: 1, 2: 20},
    {3: 1, 0: 1},
    {3: 2, 0: 1, 2: 1},
    {0: 9, 2: 1},
    {3: 1, 0: 1, 2: 13},
    {0: 30},
    {0: 1, 1: 1, 3: 1},
    {0: 1, 1: 1, 3: 1},
)


def _run_plan(model, monkeypatch, *, cpu_attn, logits_all=False, simd=True):
    """Feeds PLAN (n_batch 64: each call is one micro-batch). Returns slot -> (ids fed,
    {position: logits row}), and the op profile of the last call (profiling runs the same
    arithmetic one node at a time)."""
    monkeypatch.setenv("SAMBAY_CPU_ATTN", "1" if cpu_attn else "0")
    monkeypatch.setenv("SAMBAY_ATTN_SIMD", "1" if simd else "0")
    monkeypatch.setenv("SAMBAY_PROFILE", "1")
    c = Context(model, n_ctx=N_CTX, n_batch=64, n_seq_max=4, logits_all=logits_all, kv_type="f32", **THREADS)
    rng = np.random.default_rng(11)
    ids = {s: [] for s in range(4)}
    rows = {s: {} for s in ids}
    for step in PLAN:
        c.reset_op_profile()
        batch = [(s, rng.integers(0, model.n_vocab, n).tolist()) for s, n in step.items()]
        logits = c.decode(batch)
        r = 0
        for s, toks in batch:
            first = len(ids[s])
            ids[s] += toks
            positions = range(first, len(ids[s])) if logits_all else [len(ids[s]) - 1]
            for p in positions:
                rows[s][p] = logits[r]
                r += 1
        assert r == len(logits)
    return {s: (ids[s], rows[s]) for s in ids}, c.op_profile()


@pytest.mark.parametrize("shape, logits_all", [("g2-hd32", False), ("g2-hd32", True), ("g1-hd32", True),
                                                ("g4-hd32", False), ("g2-hd12", True)])
def test_joined_sequences_equal_per_sequence_path_and_reference(shapes, shape, logits_all, monkeypatch):
    hf, model = shapes[shape]
    new, prof = _run_plan(model, monkeypatch, cpu_attn=True, logits_all=logits_all)
    old, _ = _run_plan(model, monkeypatch, cpu_attn=False, logits_all=logits_all)
    # the last call took two joins per attention layer
    n_attn = sum(k.startswith("attn") for k in model.hparams()["layer_types"])
    assert prof["CUSTOM attn_scores_cpu"][0] == 2 * n_attn
    ref = NumpyReference.from_folder(hf)
    for s, (ids, rows) in new.items():
        assert rows.keys() == old[s][1].keys()
        got = np.stack([rows[p] for p in sorted(rows)])
        assert np.abs(got - np.stack([old[s][1][p] for p in sorted(rows)])).max() < 1e-4
        want = reference_logits(ref, ids)[sorted(rows)]
        err = np.abs(got - want).max()
        assert err < 1e-4, f"slot {s}: max |joined - reference| = {err:.3g}"


def test_joined_scalar_loop_equals_simd_loop(shapes, monkeypatch):
    _, model = shapes["g2-hd64"]
    simd, _ = _run_plan(model, monkeypatch, cpu_attn=True)
    scalar, _ = _run_plan(model, monkeypatch, cpu_attn=True, simd=False)
    for s, (_, rows) in simd.items():
        assert max(np.abs(rows[p] - scalar[s][1][p]).max() for p in rows) < 1e-5


def test_a_step_of_many_sequences_has_the_nodes_of_one(shapes, monkeypatch):
    # the joined path: one scores op, one softmax op and one V op per attention layer, however
    # many sequences
    _, model = shapes["g2-hd32"]
    monkeypatch.setenv("SAMBAY_CPU_ATTN", "1")
    monkeypatch.setenv("SAMBAY_PROFILE", "1")
    counts = {}
    for n_seq in (1, 3):
        c = Context(model, n_ctx=N_CTX, n_seq_max=n_seq, **THREADS)
        c.decode([(s, [1 + s, 2]) for s in range(n_seq)])
        c.reset_op_profile()
        c.decode([(s, [3]) for s in range(n_seq)])
        prof = c.op_profile()
        counts[n_seq] = {k: prof[k][0] for k in ("CUSTOM attn_scores_cpu", "CUSTOM attn_softmax_cpu", "CUSTOM attn_pv_cpu")}
        assert "SOFT_MAX" not in prof  # the softmax and the combination are the kernels' own op
    n_attn = sum(k.startswith("attn") for k in model.hparams()["layer_types"])
    assert counts[1] == counts[3] == dict.fromkeys(counts[1], n_attn)
