"""Context.op_profile (SAMBAY_PROFILE=1): every graph node of every step is counted and timed
under its kind, weight products by the weight's name; profiling leaves the logits unchanged and
a context made without the variable records nothing."""

from __future__ import annotations

import numpy as np

from sambay.engine import Context, Model

THREADS = dict(n_threads=2, n_threads_batch=2)


def _steps(model, n_seq: int, monkeypatch, profile: bool):
    monkeypatch.setenv("SAMBAY_PROFILE", "1" if profile else "0")
    c = Context(model, n_ctx=64, n_seq_max=n_seq, **THREADS)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.n_vocab, 5 + s).tolist() for s in range(n_seq)]
    rows = [c.decode([(s, p) for s, p in enumerate(prompts)])]
    c.reset_op_profile()
    for t in rng.integers(0, model.n_vocab, (3, n_seq)).tolist():
        rows.append(c.decode([(s, [t[s]]) for s in range(n_seq)]))
    return c, np.concatenate(rows)


def test_profile_counts_every_node_of_every_step(tiny_gguf, monkeypatch):
    model = Model(tiny_gguf()[1])
    c, profiled = _steps(model, 2, monkeypatch, profile=True)
    prof = c.op_profile()
    n_layers = model.n_layer
    # every layer has one FFN up product per step: three steps after the reset
    assert prof["MUL_MAT ffn_up.weight"][0] == 3 * n_layers
    assert all(n > 0 and s >= 0.0 for n, s in prof.values())
    assert prof["SSM_SCAN"][0] == 3 * sum(k == "mamba" for k in model.hparams()["layer_types"])
    assert not any(k[-1].isdigit() for k in prof)  # one key per kind, not per layer
    _, plain = _steps(model, 2, monkeypatch, profile=False)
    np.testing.assert_array_equal(profiled, plain)  # node-by-node compute is the same arithmetic
    c.reset_op_profile()
    assert c.op_profile() == {}


def test_no_profile_without_the_variable(tiny_gguf, monkeypatch):
    c, _ = _steps(Model(tiny_gguf()[1]), 1, monkeypatch, profile=False)
    assert c.op_profile() == {}
