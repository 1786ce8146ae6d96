"""The CPU kernels of decode-sized weight products (csrc/matmul_cpu.*). On Q4_0, Q4_K_M and Q6_K
models (x86-64 with AVX2: ggml-cpu repacks Q4_0 and Q4_K into its 8-row layouts, Q6_K stays as
it lies), decode steps of 1, 2 and 3 sequences run the kernels (the op profile counts their
nodes) and give logits bit for bit equal to ggml's mul_mat (SAMBAY_CPU_MM=0), with the AVX2
kernels and with the scalar ones (SAMBAY_MM_SIMD=0), with 1, 2 and 3 threads; steps of 4 rows
and prompts stay on ggml's mul_mat (its gemm). Where ggml's build has no AVX2 (or the machine is
not x86-64) no product takes the kernels, which the test checks instead."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from sambay import _core
from sambay.convert import convert, tiny
from sambay.engine import Context, Model
from sambay.quantization import quantize

N_LAYERS = 12  # tiny-12: every layer has an MLP


# the layouts the kernel reads: repacked Q4_0 (ffn_up of a Q4_0 file), repacked Q4_K (Q4_K_M),
# Q6_K where it lies (Q6_K; the tied output of the other two)
QTYPES = ("Q4_0", "Q4_K_M", "Q6_K")


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm_cpu")
    ck = tiny.write_checkpoint(root / "ck", "tiny-12", seed=11)
    return convert(ck, root / "f32.gguf", outtype="f32", progress=False)


@pytest.fixture(scope="module", params=QTYPES)
def q_model(request, f32_model):
    path = f32_model.with_name(f"{request.param}.gguf")
    quantize(f32_model, path, request.param, progress=False)
    return Model(path)


def _takes_kernel() -> bool:
    """Whether this machine's ggml repacks Q4_0 into the layout the kernel reads."""
    cpu = next(b for b in _core.system_info()["backends"] if b["name"] == "CPU")
    return platform.machine().lower() in ("x86_64", "amd64") and cpu["features"].get("AVX2") == "1"


def _run(model, monkeypatch, *, cpu_mm: bool, simd: bool = True, threads: int = 2, profile: bool = False):
    """Prompts of 5, 9 and 14 tokens in one micro-batch, then 6 rounds of a 1-, a 2- and a
    3-sequence decode step, then one step of 4 rows (three sequences, one of them 2 tokens; 3 output rows after the YOCO cut).
    Returns the logits of every step and the op profile of the decode steps (with ``profile``)."""
    monkeypatch.setenv("SAMBAY_CPU_MM", "1" if cpu_mm else "0")
    monkeypatch.setenv("SAMBAY_MM_SIMD", "1" if simd else "0")
    monkeypatch.setenv("SAMBAY_PROFILE", "1" if profile else "0")
    c = Context(model, n_ctx=64, n_batch=32, n_seq_max=3, kv_type="f32", n_threads=threads,
                n_threads_batch=threads)
    rng = np.random.default_rng(4)
    vocab = model.n_vocab
    out = [np.stack(c.decode([(s, rng.integers(0, vocab, n).tolist()) for s, n in enumerate((5, 9, 14))]))]
    c.reset_op_profile()
    profiles = {}
    for _ in range(6):
        for n_seq in (1, 2, 3):
            before = c.op_profile()
            out.append(np.stack(c.decode([(s, [int(rng.integers(0, vocab))]) for s in range(n_seq)])))
            profiles[n_seq] = _diff(c.op_profile(), before)
    before = c.op_profile()
    out.append(np.stack(c.decode([(0, rng.integers(0, vocab, 2).tolist()), (1, [3]), (2, [4])])))
    profiles[4] = _diff(c.op_profile(), before)
    return out, profiles


def _diff(after, before):
    return {k: n - before.get(k, (0, 0.0))[0] for k, (n, _) in after.items() if n - before.get(k, (0, 0.0))[0]}


def test_kernel_equals_ggml_bit_for_bit(q_model, monkeypatch):
    ggml, _ = _run(q_model, monkeypatch, cpu_mm=False)
    for simd in (True, False):
        for threads in (1, 2, 3):
            if not simd and threads != 2:
                continue  # the scalar loop is slow; one thread count shows it
            ours, _ = _run(q_model, monkeypatch, cpu_mm=True, simd=simd, threads=threads)
            for step, (a, b) in enumerate(zip(ours, ggml)):
                assert np.array_equal(a, b), (
                    f"simd={simd} threads={threads} step {step}: max |diff| {np.abs(a - b).max():.3e}")


def test_which_products_take_the_kernel(q_model, monkeypatch):
    _, prof = _run(q_model, monkeypatch, cpu_mm=True, profile=True)
    _, off = _run(q_model, monkeypatch, cpu_mm=False, profile=True)
    if not _takes_kernel():
        assert not any(k.startswith("CUSTOM mm_cpu") for p in prof.values() for k in p)
        return
    assert _core.system_info()["mm_kernel"] == "avx2"
    for rows in (1, 2, 3):
        # every MLP's up and down products, once per step
        assert prof[rows].get("CUSTOM mm_cpu ffn_up.weight") == N_LAYERS, prof[rows]
        assert prof[rows].get("CUSTOM mm_cpu ffn_down.weight") == N_LAYERS
        assert "MUL_MAT ffn_up.weight" not in prof[rows]
        assert off[rows].get("MUL_MAT ffn_up.weight") == N_LAYERS
        assert not any(k.startswith("CUSTOM mm_cpu") for k in off[rows])
        # the tied output (Q6_K in all three files)
        assert prof[rows].get("CUSTOM mm_cpu token_embd.weight") == 1
    # 4 rows: ggml's gemm up to the YOCO cut; the layers after it run on the 3 output rows
    ggml_layers, our_layers = prof[4].get("MUL_MAT ffn_up.weight", 0), prof[4].get("CUSTOM mm_cpu ffn_up.weight", 0)
    assert ggml_layers > 0 and our_layers > 0 and ggml_layers + our_layers == N_LAYERS, prof[4]


def test_q6_K_matrices_leave_the_mapped_file(f32_model, monkeypatch):
    """With the file mapped, the Q6_K matrices the kernel reads as stored are copied into a
    buffer advised for huge pages (a mapped file has 4 KiB pages); SAMBAY_HUGE_PAGES=0 keeps
    them in the mapping. The logits are the same either way."""
    path = f32_model.with_name("Q6_K-mapped.gguf")
    quantize(f32_model, path, "Q6_K", progress=False)
    copied = Model(path)
    assert copied.mmapped  # the other weights (F32 norms, ...) stay in the file
    if _takes_kernel() and platform.system() == "Linux":
        # every Q6_K matrix: all but a few F32 and small tensors
        assert copied.huge_page_bytes > copied.weights_bytes // 2
    else:
        assert copied.huge_page_bytes == 0
    monkeypatch.setenv("SAMBAY_HUGE_PAGES", "0")
    mapped = Model(path)
    assert mapped.huge_page_bytes == 0
    monkeypatch.delenv("SAMBAY_HUGE_PAGES")
    a, _ = _run(copied, monkeypatch, cpu_mm=True)
    b, _ = _run(mapped, monkeypatch, cpu_mm=True)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
