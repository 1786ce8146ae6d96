"""The built-in demo model: shipped, traceable to its training checkpoint, and accurate.

The demo model (python/sambay/data/demo-model.gguf) was trained by train/train.py; its HF
checkpoint is committed in train/demo-model-hf/. These tests check that the shipped file is
exactly that checkpoint converted at F16 (lossless: the checkpoint stores its matrices in F16),
and that, decoded greedily through the PyTorch reference, it solves held-out problems it never
saw, short and long-range (operands several sliding windows before the question); and that
the C++ engine, at F32, F16 and after each quantizer, keeps what the model learned: its greedy
exact-match accuracy on the same problems is the reference's (F32, F16: within one problem;
Q8_0: within one point) or above a floor measured for the 4-bit types.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sambay.convert import convert  # noqa: E402
from sambay.demo import demo_model_path  # noqa: E402
from sambay.gguf_metadata import read_metadata  # noqa: E402
from needs_torch import import_torch  # noqa: E402
from train import data  # noqa: E402
from train.evaluate import (  # noqa: E402
    evaluate_engine,
    evaluate_reference,
    load_tokenizer,
    score,
)

DEMO_HF = ROOT / "train" / "demo-model-hf"

# the fixed held-out set of these tests (a slice of train/evaluate.py's default set)
N_SHORT, N_LONG = 30, 30
# measured on this set with the reference (see README "Built-in demo model"); the thresholds
# leave room for one or two problems, not for a broken model
MIN_REFERENCE_ACC_SHORT = 0.95
MIN_REFERENCE_ACC_LONG = 0.95
Q4_K_M_MAX_LOSS = 2
Q4_0_MAX_LOSS = 2


def _tensors(path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in r.tensors}


@pytest.fixture(scope="module")
def held_out():
    return data.held_out_set(N_SHORT, N_LONG)


def test_demo_model_is_shipped_and_small():
    path = Path(demo_model_path())
    assert path.is_file() and path.stat().st_size < 4 * 2**20
    meta = read_metadata(path)
    assert meta["general.architecture"] == "phi4flash"
    n = meta["phi4flash.block_count"]
    kinds = list(meta["phi4flash.layer_types"])
    assert n % 4 == 0 and len(kinds) == n
    assert set(kinds) == {0, 1, 2, 3, 4}  # Mamba, SWA, full, GMU, cross: all five
    assert meta["phi4flash.attention.sliding_window"] == 16
    assert "<|assistant|>" in meta["tokenizer.chat_template"]


def test_shipped_gguf_is_the_committed_checkpoint(tmp_path):
    """Holds on every platform, not just the one that wrote the file: the converter's only
    float math (A = -exp(A_log), λ) gives correctly rounded or software-computed values
    (tests/test_convert_exact.py); the float32 -> float16 cast is IEEE round-to-nearest-even,
    the same everywhere."""
    out = convert(DEMO_HF, tmp_path / "f16.gguf", outtype="f16", progress=False)
    want, got = _tensors(out), _tensors(demo_model_path())
    assert sorted(want) == sorted(got)
    for name in want:
        assert want[name].dtype == got[name].dtype and np.array_equal(want[name], got[name]), name


def test_f16_gguf_is_lossless(tmp_path):
    f32 = _tensors(convert(DEMO_HF, tmp_path / "f32.gguf", outtype="f32", progress=False))
    f16 = _tensors(demo_model_path())
    assert any(x.dtype == np.float16 for x in f16.values())
    for name, x in f16.items():
        assert np.array_equal(x.astype(np.float32), f32[name].astype(np.float32)), name


def test_long_range_operands_are_far_beyond_the_window(held_out):
    tok = load_tokenizer(DEMO_HF)
    window = 16
    for p in held_out:
        if not p.long_range:
            continue
        ids = tok.encode(p.prompt, add_special_tokens=False).ids
        head = p.prompt.split(" b = ")[0] + f" b = {p.b}"  # up to the last operand digit
        n_head = len(tok.encode(head, add_special_tokens=False).ids)
        assert len(ids) - n_head >= 4 * window, p.prompt


@pytest.fixture(scope="module")
def reference_outputs(held_out):
    import_torch()  # the accuracy checks compare with the PyTorch reference's greedy answers
    return evaluate_reference(DEMO_HF, held_out)


def test_reference_solves_held_out_problems(held_out, reference_outputs):
    res = score(held_out, reference_outputs)
    assert res["short"][0] >= MIN_REFERENCE_ACC_SHORT, res
    assert res["long"][0] >= MIN_REFERENCE_ACC_LONG, res


# ---------------------------------------------------------------------------------------------
# the engine and the quantizers

# allowed accuracy loss vs the reference, in problems out of N_SHORT (or N_LONG); measured
# values are in README "Built-in demo model"
ENGINE_CASES = [
    ("F32", 1),
    ("F16", 1),
    ("Q8_0", 0),  # "within 1 point": 1 point of 30 problems is less than one problem
    ("Q4_K_M", Q4_K_M_MAX_LOSS),
    ("Q4_0", Q4_0_MAX_LOSS),
]


@pytest.fixture(scope="module")
def demo_ggufs(tmp_path_factory):
    from sambay import quantize

    root = tmp_path_factory.mktemp("demo")
    paths = {"F32": convert(DEMO_HF, root / "f32.gguf", outtype="f32", progress=False),
             "F16": Path(demo_model_path())}
    for qtype in ("Q8_0", "Q4_K_M", "Q4_0"):
        out = root / f"{qtype}.gguf"
        quantize(demo_model_path(), out, qtype, n_threads=1, progress=False)
        paths[qtype] = out
    return paths


@pytest.mark.parametrize("qtype,max_loss", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_engine_keeps_what_the_model_learned(demo_ggufs, held_out, reference_outputs, qtype,
                                             max_loss):
    ref = score(held_out, reference_outputs)
    eng = score(held_out, evaluate_engine(demo_ggufs[qtype], held_out, n_threads=1))
    for subset in ("short", "long"):
        (ra, _, n), (ea, _, _) = ref[subset], eng[subset]
        lost = round((ra - ea) * n)
        assert lost <= max_loss, (subset, ref, eng)
        if qtype in ("F32", "F16"):  # exact math: neither better nor worse by more than one
            assert abs(round((ra - ea) * n)) <= 1, (subset, ref, eng)


# ---------------------------------------------------------------------------------------------
# the CLI uses it when no model is given


def _cli(*args: str, stdin: str = ""):
    import subprocess

    return subprocess.run([sys.executable, "-m", "sambay", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def _a_held_out_addition() -> data.Problem:
    return next(p for p in data.held_out_set(N_SHORT, 0) if p.op == "+")


def test_run_without_a_model_uses_the_demo_model():
    p = _a_held_out_addition()
    out = _cli("run", "-p", f"What is {p.a} + {p.b}?", "--temp", "0", "-t", "1", "-q")
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if "demo model" in line]
    assert len(notes) == 1 and "built-in" in notes[0], out.stderr
    assert out.stdout.startswith("<think>Ones: ")
    assert f"The answer is {p.answer}." in out.stdout, out.stdout


def test_chat_without_a_model_uses_the_demo_model():
    p = _a_held_out_addition()
    out = _cli("chat", "--temp", "0", "-t", "1", stdin=f"What is {p.a} + {p.b}?\n")
    assert out.returncode == 0, out.stderr
    assert "built-in demo model" in out.stderr
    assert f"The answer is {p.answer}." in out.stdout, out.stdout
