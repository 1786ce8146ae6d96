"""Flash attention as the GPUs run it (csrc/blocks/attn.cpp): CUDA and Metal have no kernel with
a V head size other than K's, so off the CPU each stripe is two ``flash_attn_ext`` calls, one per
half of each V pair, joined again. ``SAMBAY_CPU_ATTN=0`` builds that graph on the CPU (with
SAMBAY_TEST_DEVICE naming a GPU both settings build it, and head size 32 is refused there). Its
logits equal the CPU's one-call flash path and the mul_mat path, for f32 and f16 caches, three
sequences of different lengths in one context, across the sliding-window boundary (W = 16),
with prompt chunks and single-token steps."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import selected_device_is_gpu, three_sequences
from sambay.engine import Context, Model

N_CTX = 96
THREADS = dict(n_threads=2, n_threads_batch=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sambay.convert import convert, tiny

    root = tmp_path_factory.mktemp("flash_split")
    out = {}
    # tiny-12's head size (32) and the real model's (64, 4 heads of tiny-12's width)
    for name, overrides in {"hd32": {}, "hd64": {"num_attention_heads": 4, "num_key_value_heads": 2}}.items():
        hf = tiny.write_checkpoint(root / name, "tiny-12", seed=5, overrides=overrides)
        path = root / f"{name}.gguf"
        convert(hf, path, outtype="f32", progress=False)
        out[name] = Model(path)
    return out


def _run(model, monkeypatch, *, flash, split, kv_type="f32", n_batch=16):
    """Three sequences (prompts of 3, 21 and 40 tokens, in n_batch chunks together), then 20
    decode steps of all three; returns slot -> logits rows."""
    monkeypatch.setenv("SAMBAY_CPU_ATTN", "0" if split else "1")
    c = Context(model, n_ctx=N_CTX, n_batch=n_batch, n_seq_max=3, kv_type=kv_type, flash_attn=flash, **THREADS)
    return three_sequences(c, model.n_vocab, seed=11, n_steps=20, n_batch=n_batch)[0]


def _max_diff(a, b):
    return max(np.abs(a[s] - b[s]).max() for s in a)


# (KV type, split vs the mul_mat path). The split and the one-call flash path agree to the last
# bit on the CPU: each output value is the same sum over the same weights. With F16 caches
# ggml's CPU flash kernel accumulates the weighted V sum in F16, which puts both flash paths
# ~1e-2 from the F32 caches' logits on these tiny models (the mul_mat path stays within 3e-4;
# measured: 5e-3 at hd 64, 1.1e-2 at hd 32), so the f16 bound is the flash kernel's, not the split's.
ATOL = {"f32": 1e-4, "f16": 2e-2}


@pytest.mark.parametrize("shape, kv_type, n_batch", [
    ("hd32", "f32", 16), ("hd32", "f32", 5), ("hd64", "f32", 16), ("hd64", "f16", 16), ("hd32", "f16", 5),
])
def test_split_flash_equals_cpu_flash_and_mul_mat(models, shape, kv_type, n_batch, monkeypatch):
    atol = ATOL[kv_type]
    model = models[shape]
    if shape == "hd32" and selected_device_is_gpu():
        # no GPU flash kernel for head size 32: refused when the context is made
        with pytest.raises(ValueError, match="no flash-attention kernel for this model's attention head size 32"):
            _run(model, monkeypatch, flash=True, split=True, kv_type=kv_type, n_batch=n_batch)
        return
    split = _run(model, monkeypatch, flash=True, split=True, kv_type=kv_type, n_batch=n_batch)
    whole = _run(model, monkeypatch, flash=True, split=False, kv_type=kv_type, n_batch=n_batch)
    plain = _run(model, monkeypatch, flash=False, split=True, kv_type=kv_type, n_batch=n_batch)
    # f32 caches: the same sums over the same weights. f16 caches: the CPU flash kernel sums V
    # in F16, and where those roundings fall depends on the V row length and the build's SIMD
    # width (bit-equal with the wheel's AVX2 build, 5.5e-3 apart with a native AVX-512 build)
    assert _max_diff(split, whole) < (1e-5 if kv_type == "f32" else atol)
    assert _max_diff(split, plain) < atol
    if kv_type != "f32":
        exact = _run(model, monkeypatch, flash=False, split=True, n_batch=n_batch)  # f32 caches
        assert _max_diff(split, exact) < atol
