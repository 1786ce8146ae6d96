"""The CPU kernels of decode-sized weight products (csrc/matmul_cpu.*). On Q4_0, Q4_K_M and Q6_K
models (x86-64 with AVX2: ggml-cpu repacks Q4_0 and Q4_K into its 8-row layouts, Q6_K stays as
it lies), decode steps of 1 to 16 rows (1, 2, 3 sequences; 7, 13 and 16 rows, which the AVX2
kernels take in passes of 4, 8, 16 and fewer rows) run the kernels (the op profile counts their
nodes) and give logits bit for bit equal to ggml's mul_mat (SAMBAY_CPU_MM=0) on its gemv (steps
of more than 3 rows fed to it in pieces of at most 3), with the AVX2 kernels and with the scalar
ones (SAMBAY_MM_SIMD=0), with 1, 2 and 3 threads; a prompt of 28 rows stays on ggml's mul_mat
up to the YOCO cut. Where ggml's build has no AVX2 (or the machine is
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


# decode steps of three sequences with several tokens each: (tokens of each sequence, rows)
MULTI = (((3, 2, 2), 7), ((5, 4, 4), 13), ((6, 5, 5), 16))


def _run(model, monkeypatch, *, cpu_mm: bool, simd: bool = True, threads: int = 2, profile: bool = False,
         pieces: bool = False):
    """Prompts of 5, 9 and 14 tokens in one micro-batch (28 rows: more than the kernels take),
    then 4 rounds of a 1-, a 2- and a 3-sequence decode step; then, each in a fresh context after
    the same prompts, one step of 7, 13 or 16 rows (every layer after the YOCO cut runs on the 3
    output rows). Fresh contexts, because a difference in the last bits of one step's output
    (ggml's gemm against the kernels) can move a value of the next step's activations across a
    Q8 rounding boundary, which changes that step's logits by a quantization step. With
    ``pieces``, those steps' tokens go in as decode calls of at most 3 rows of one sequence
    (ggml's gemv then, not its gemm). Returns the logits of every step and the op profile of
    each kind of step, by rows (with ``profile``)."""
    monkeypatch.setenv("SAMBAY_CPU_MM", "1" if cpu_mm else "0")
    monkeypatch.setenv("SAMBAY_MM_SIMD", "1" if simd else "0")
    monkeypatch.setenv("SAMBAY_PROFILE", "1" if profile else "0")
    rng = np.random.default_rng(4)
    vocab = model.n_vocab
    prompts = [(s, rng.integers(0, vocab, n).tolist()) for s, n in enumerate((5, 9, 14))]
    out, profiles = [], {}

    def context():
        return Context(model, n_ctx=64, n_batch=32, n_seq_max=3, kv_type="f32", n_threads=threads,
                       n_threads_batch=threads)

    def step(c, batch, rows):
        before = c.op_profile()
        out.append(np.stack(c.decode(batch)))
        profiles[rows] = _diff(c.op_profile(), before)

    c = context()
    step(c, prompts, 28)
    for _ in range(4):
        for n_seq in (1, 2, 3):
            step(c, [(s, [int(rng.integers(0, vocab))]) for s in range(n_seq)], n_seq)
    for lens, rows in MULTI:
        c = context()
        c.decode(prompts)
        batch = [(s, rng.integers(0, vocab, n).tolist()) for s, n in enumerate(lens)]
        if pieces:
            out.append(np.stack([[c.decode([(s, t[i:i + 3])]) for i in range(0, len(t), 3)][-1][0] for s, t in batch]))
        else:
            step(c, batch, rows)
    return out, profiles


def _diff(after, before):
    return {k: n - before.get(k, (0, 0.0))[0] for k, (n, _) in after.items() if n - before.get(k, (0, 0.0))[0]}


def test_kernels_equal_ggml(q_model, monkeypatch):
    """Bit for bit: the kernels equal ggml's gemv for every row, whatever the rows per pass. Steps
    of 7 to 16 rows are compared with the same tokens fed to ggml in pieces of at most 3 rows
    (its gemv): its gemm, which a 4-row or larger step gets, sums some Q4_K floats in another
    order (measured: logits 3e-7 apart at 13 rows; ~1e-2 at 16 rows, a quantization step, once a
    later layer's Q8 activations round the other way), so it is not the reference here."""
    ggml, _ = _run(q_model, monkeypatch, cpu_mm=False, pieces=True)
    scalar, _ = _run(q_model, monkeypatch, cpu_mm=True, simd=False)
    rows = [28] + [n for _ in range(4) for n in (1, 2, 3)] + [r for _, r in MULTI]
    for threads in (1, 2, 3):
        ours, _ = _run(q_model, monkeypatch, cpu_mm=True, threads=threads)
        for step, (a, s, g) in enumerate(zip(ours, scalar, ggml)):
            what = f"threads={threads} step {step} ({rows[step]} rows)"
            # the AVX2 kernels (passes of 16, 8, 4 or fewer rows) equal the scalar loops (row by row)
            assert np.array_equal(a, s), f"{what}: AVX2 vs scalar {np.abs(a - s).max():.3e}"
            assert np.array_equal(a, g), f"{what}: vs ggml {np.abs(a - g).max():.3e}"


def test_which_products_take_the_kernel(q_model, monkeypatch):
    _, prof = _run(q_model, monkeypatch, cpu_mm=True, profile=True)
    _, off = _run(q_model, monkeypatch, cpu_mm=False, profile=True)
    if not _takes_kernel():
        assert not any(k.startswith("CUSTOM mm_cpu") for p in prof.values() for k in p)
        return
    assert _core.system_info()["mm_kernel"] == "avx2"
    for rows in (1, 2, 3, 7, 13, 16):
        # every MLP's up and down products, once per step
        assert prof[rows].get("CUSTOM mm_cpu ffn_up.weight") == N_LAYERS, prof[rows]
        assert prof[rows].get("CUSTOM mm_cpu ffn_down.weight") == N_LAYERS
        assert "MUL_MAT ffn_up.weight" not in prof[rows]
        assert off[rows].get("MUL_MAT ffn_up.weight") == N_LAYERS
        assert not any(k.startswith("CUSTOM mm_cpu") for k in off[rows])
        # the tied output (Q6_K in all three files)
        assert prof[rows].get("CUSTOM mm_cpu token_embd.weight") == 1
    # 28 rows: ggml's gemm up to the YOCO cut; the layers after it run on the 3 output rows
    ggml_layers, our_layers = prof[28].get("MUL_MAT ffn_up.weight", 0), prof[28].get("CUSTOM mm_cpu ffn_up.weight", 0)
    assert ggml_layers > 0 and our_layers > 0 and ggml_layers + our_layers == N_LAYERS, prof[28]


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
