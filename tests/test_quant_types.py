"""Every quantization type converts, loads, runs, and stays within a KL bound of F32.

The bounds are about 4x the KL divergence measured on this model and input (tiny-12, 192
random-token positions); a wrong block format, a swapped type or a broken kernel moves KL by
orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from sambay.convert import convert, tiny
from sambay.engine import Context, Model
from sambay.quantization import QUANT_TYPES, quantize

# measured mean KL (nats) on this setup, rounded up ~4x
# F16: ggml built for a CPU with FP16 vector arithmetic (Armv8.2-a+fp16, e.g. a Raspberry Pi 5
# native build) accumulates F16 dot products in F16: KL 1.2e-7 measured there (emulated
# Cortex-A76), against 1.5e-8 with F32 accumulation (x86-64, wheel and native builds)
KL_BOUND = {"F32": 1e-9, "F16": 3e-7, "BF16": 5e-6, "Q8_0": 5e-5, "Q6_K": 3e-4, "Q5_0": 1e-3,
            "Q5_1": 1e-3, "Q5_K_M": 6e-4, "Q5_K_S": 7e-4, "Q4_0": 4e-3, "Q4_1": 3e-3,
            "Q4_K_M": 2e-3, "Q4_K_S": 2.5e-3, "Q3_K_M": 5e-3, "Q2_K": 2.5e-2}


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _logits(path, tokens):
    ctx = Context(Model(path), n_ctx=len(tokens), n_batch=64, logits_all=True, kv_type="f32",
                  n_threads=1, n_threads_batch=1)
    return ctx.eval(tokens)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qt")
    ck = tiny.write_checkpoint(root / "ck", "tiny-12", seed=5)
    f32 = convert(ck, root / "f32.gguf", outtype="f32", progress=False)
    tokens = np.random.default_rng(0).integers(0, 1024, 192)
    return root, f32, tokens, _log_softmax(_logits(f32, tokens))


def test_every_type_is_covered():
    assert set(KL_BOUND) == set(QUANT_TYPES)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quant_type_runs_within_bound(setup, qtype):
    root, f32, tokens, ref = setup
    out = root / f"{qtype}.gguf"
    quantize(f32, out, qtype, progress=False)
    lp = _log_softmax(_logits(out, tokens))
    kl = float((np.exp(ref) * (ref - lp)).sum(-1).mean())
    assert kl <= KL_BOUND[qtype], f"{qtype}: KL {kl:.3e} > {KL_BOUND[qtype]:.1e}"
    if qtype not in ("F32", "F16", "BF16"):
        assert kl > 0  # it really was quantized
    out.unlink()
