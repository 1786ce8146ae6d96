"""The demo model's training code computes exactly the reference's math.

train/model.py's batched SambaYTrain (used to train the built-in demo model) must agree with
tests/reference_model.py's SambaYReference, or the shipped model would not be the model that
was trained. Also checks the hand-written scan gradient and the data generator's invariants.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from needs_torch import import_torch

torch = import_torch()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference_model import load_reference  # noqa: E402
from sambay.convert.tiny import write_checkpoint  # noqa: E402
from train import data  # noqa: E402
from train.model import SambaYTrain, SelectiveScan, init_params  # noqa: E402


@pytest.mark.parametrize("config,window", [("tiny-8", 4), ("tiny-12", 8)])
def test_batched_forward_equals_reference(tmp_path, config, window):
    hf = write_checkpoint(tmp_path / "m", config, seed=3, overrides={"sliding_window": window},
                          tokenizer=False)
    ref = load_reference(hf, dtype=torch.float64)
    tensors = {n: t for n, t in __import__("reference_model").load_safetensors_folder(hf).items()}
    import json
    cfg = json.loads((hf / "config.json").read_text())
    model = SambaYTrain(cfg, tensors, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    T = 3 * window + 5
    ids = torch.randint(0, cfg["vocab_size"], (2, T), generator=g)
    with torch.no_grad():
        got = model(ids)
    for b, n in ((0, T), (1, T - 7)):  # row 1: a shorter sequence, right-padded
        want = ref.forward(ids[b, :n])
        assert torch.allclose(got[b, :n], want, atol=1e-10, rtol=0), (got[b, :n] - want).abs().max()


def test_init_params_load_in_reference(tmp_path):
    cfg = dict(__import__("sambay.convert.tiny", fromlist=["make_config"]).make_config("tiny-8"))
    tensors = init_params(cfg, seed=0)
    from reference_model import SambaYConfig, SambaYReference
    ref = SambaYReference(SambaYConfig.from_hf(cfg), tensors, torch.float64)
    model = SambaYTrain(cfg, tensors, dtype=torch.float64)
    ids = torch.arange(20) % cfg["vocab_size"]
    with torch.no_grad():
        assert torch.allclose(model(ids[None])[0], ref.forward(ids), atol=1e-10, rtol=0)


def test_scan_gradient():
    g = torch.Generator().manual_seed(1)
    B, T, D, S = 2, 6, 3, 4
    f64 = dict(generator=g, dtype=torch.float64)
    delta = (torch.rand(B, T, D, **f64) + 0.1).requires_grad_()
    A = (-torch.rand(D, S, **f64) - 0.1).requires_grad_()
    du = torch.randn(B, T, D, **f64).requires_grad_()
    Bm = torch.randn(B, T, S, **f64).requires_grad_()
    C = torch.randn(B, T, S, **f64).requires_grad_()
    assert torch.autograd.gradcheck(SelectiveScan.apply, (delta, A, du, Bm, C))


def test_trace_arithmetic_and_held_out_split():
    rng = random.Random(0)
    for _ in range(500):
        p = data.make_problem(rng, long_range=rng.random() < 0.3)
        assert data.parse_answer(p.completion) == data.solve(p.op, p.a, p.b) == p.answer
        # every step of the trace is true arithmetic
        for step in p.completion.split("<think>")[1].split("</think>")[0].split(". "):
            expr, res = step.split(": ")[1].split(",")[0].split("=")
            assert eval(expr) == int(res), step
    held = data.held_out_set(30, 30)
    assert all(data.is_held_out(p.op, p.a, p.b) for p in held)
    stream = data.training_stream(seed=5)
    assert not any(data.is_held_out(p.op, p.a, p.b) for p in (next(stream) for _ in range(2000)))
