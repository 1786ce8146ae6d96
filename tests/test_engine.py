"""sambay._core against the NumPy float64 reference (tests/numpy_reference.py) on converted
tiny checkpoints (spec §12); no torch needed.

f32 GGUF + f32 KV must match the reference to 1e-4 absolute on logits (spec §0.1 item 8:
plausible bugs move logits by >= 9e-3); a deliberately perturbed model must fail that bound.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import N_CTX, make_gguf, reference_logits, rewrite_gguf
from numpy_reference import NumpyReference
from sambay.engine import Context, ContextFullError, Model, StateError

ATOL_F32 = 1e-4
# one thread: tiny models gain nothing from more, and ggml's per-node barriers stall on a
# loaded 2-core machine; test_threads_do_not_change_results runs two
THREADS = dict(n_threads=1, n_threads_batch=1)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="session", params=["tiny-12", "tiny-8"])
def tiny(request, tiny_gguf):
    """(hf_dir, f32 gguf, Model, reference) for each tiny config."""
    hf_dir, path = tiny_gguf(request.param)
    return hf_dir, path, Model(path), NumpyReference.from_folder(hf_dir)


@pytest.fixture(scope="session")
def tiny12(tiny_gguf):
    hf_dir, path = tiny_gguf("tiny-12")
    return hf_dir, path, Model(path), NumpyReference.from_folder(hf_dir)


def _ids(n, n_vocab, seed=0):
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def _ctx(model, **kw):
    args = dict(n_ctx=N_CTX, kv_type="f32", **THREADS)
    args.update(kw)
    return Context(model, **args)


# ---------------------------------------------------------------------------------------------
# prefill parity


@pytest.mark.parametrize("which", ["1", "2", "3", "W-1", "W", "W+1", "3W+5"])
def test_prefill_all_positions_match_reference(tiny, which):
    _, _, model, ref = tiny
    W = model.hparams()["n_swa"]
    n = {"1": 1, "2": 2, "3": 3, "W-1": W - 1, "W": W, "W+1": W + 1, "3W+5": 3 * W + 5}[which]
    ids = _ids(n, model.n_vocab, seed=n)
    logits = _ctx(model, logits_all=True).eval(ids)
    assert logits.shape == (n, model.n_vocab) and logits.dtype == np.float32
    want = reference_logits(ref, ids)
    err = np.abs(logits - want).max()
    assert err < ATOL_F32, f"max |engine - reference| = {err:.3g} at prompt length {n}"


def _perturb_lambda(meta_key, layer):
    def f(values):
        values = list(values)
        values[layer] += 0.1
        return values
    return {meta_key: f}


@pytest.mark.parametrize("perturbation", ["lambda_swa", "lambda_cross", "memory_tap_D", "sub_norm"])
def test_perturbed_model_fails_the_tolerance(tiny12, root, perturbation):
    """The tolerance is tight enough to see a small error in λ, D or the sub-norm."""
    _, path, model, ref = tiny12
    hp = model.hparams()
    ml, kinds = hp["memory_layer"], hp["layer_types"]
    cross = kinds.index("attn_cross")
    kw = {}
    if perturbation == "lambda_swa":
        kw["set_kv"] = _perturb_lambda("phi4flash.attention.diff_lambda", 1)
    elif perturbation == "lambda_cross":
        kw["set_kv"] = _perturb_lambda("phi4flash.attention.diff_lambda", cross)
    elif perturbation == "memory_tap_D":
        kw["tensor_fn"] = {f"blk.{ml}.ssm_d": lambda d: d * 1.05}
    else:
        kw["tensor_fn"] = {f"blk.{cross}.attn_sub_norm.weight": lambda w: w * 1.05}
    bad = rewrite_gguf(path, root / f"perturbed-{perturbation}.gguf", **kw)
    ids = _ids(3 * hp["n_swa"] + 5, model.n_vocab, seed=7)
    want = reference_logits(ref, ids)
    good = _ctx(model, logits_all=True).eval(ids)
    assert np.abs(good - want).max() < ATOL_F32
    worse = _ctx(Model(bad), logits_all=True).eval(ids)
    assert np.abs(worse - want).max() > 5 * ATOL_F32


def test_unperturbed_rewrite_is_identical(tiny12, root):
    """The GGUF rewriter used above changes nothing by itself."""
    _, path, model, _ = tiny12
    copy = rewrite_gguf(path, root / "copy.gguf")
    ids = _ids(20, model.n_vocab)
    a = _ctx(model, logits_all=True).eval(ids)
    b = _ctx(Model(copy), logits_all=True).eval(ids)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# decode, generation, chunking, YOCO


def test_decode_steps_match_full_forward(tiny):
    """Prefill 5 then 64 one-token steps: crosses the window and wraps the SWA ring."""
    _, _, model, ref = tiny
    ids = _ids(5 + 64, model.n_vocab, seed=3)
    want = reference_logits(ref, ids)
    ctx = _ctx(model)
    out = [ctx.eval(ids[:5])[0]]
    for t in ids[5:]:
        out.append(ctx.eval([t])[0])
    assert ctx.n_past == len(ids)
    err = np.abs(np.stack(out) - want[4:]).max()
    assert err < ATOL_F32, f"decode max |engine - reference| = {err:.3g}"


def test_greedy_generation_matches_reference(tiny):
    _, _, model, ref = tiny
    prompt = _ids(8, model.n_vocab, seed=11)
    ctx = _ctx(model)
    logits = ctx.eval(prompt)[0]
    got = []
    for _ in range(64):
        tok = int(np.argmax(logits))
        got.append(tok)
        logits = ctx.eval([tok])[0]
    cache = ref.new_cache()
    rl = ref.forward_incremental(prompt, cache)[-1]
    want = []
    for _ in range(64):
        tok = int(np.argmax(rl))
        want.append(tok)
        rl = ref.forward_incremental([tok], cache)[-1]
    assert got == want


@pytest.mark.parametrize("n_batch", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(tiny12, n_batch):
    _, _, model, _ = tiny12
    ids = _ids(61, model.n_vocab, seed=5)
    one = _ctx(model, n_batch=512, logits_all=True)
    a = one.eval(ids)
    chunked = _ctx(model, n_batch=n_batch, logits_all=True)
    b = chunked.eval(ids)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # the states left behind are the same: continue both
    np.testing.assert_allclose(chunked.eval([17]), one.eval([17]), rtol=0, atol=1e-5)
    # and last-token-only chunked prefill gives the last row
    last = _ctx(model, n_batch=n_batch).eval(ids)
    assert last.shape == (1, model.n_vocab)
    np.testing.assert_allclose(last[0], a[-1], rtol=0, atol=1e-5)


class _StopAfter(Exception):
    pass


@pytest.mark.parametrize("logits_all", [False, True])
def test_on_ubatch_sees_every_micro_batch_of_the_engine(tiny12, logits_all):
    """The engine is the one place an eval is cut into micro-batches: its hook reports each
    boundary, with the rows written so far (the last token's row, or all rows)."""
    _, _, model, _ = tiny12
    ids = _ids(30, model.n_vocab, seed=9)
    want = _ctx(model, logits_all=True).eval(ids)
    seen = []

    def hook(done, total, logits):
        seen.append((done, total))
        rows = want[:done] if logits_all else want[done - 1:done]
        assert logits.shape == rows.shape
        np.testing.assert_allclose(logits, rows, rtol=0, atol=1e-5)

    got = _ctx(model, n_batch=7, logits_all=logits_all).eval(ids, on_ubatch=hook)
    assert seen == [(7, 30), (14, 30), (21, 30), (28, 30), (30, 30)]
    np.testing.assert_allclose(got, want if logits_all else want[-1:], rtol=0, atol=1e-5)


def test_an_exception_in_on_ubatch_stops_between_micro_batches(tiny12):
    """Raised after the 2nd micro-batch: the context holds exactly those 14 tokens, and the
    rest continues to the logits of an uninterrupted run."""
    _, _, model, _ = tiny12
    ids = _ids(30, model.n_vocab, seed=9)
    want = _ctx(model, logits_all=True).eval(ids)
    ctx = _ctx(model, n_batch=7, logits_all=True)
    kept = []

    def hook(done, total, logits):
        kept.append(logits)
        if done == 14:
            raise _StopAfter

    with pytest.raises(_StopAfter):
        ctx.eval(ids, on_ubatch=hook)
    assert ctx.n_past == 14 and not ctx.needs_reset
    np.testing.assert_allclose(kept[-1], want[:14], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ctx.eval(ids[14:]), want[14:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_type, atol", [("f32", ATOL_F32), ("f16", 1e-2)])
def test_flash_attention_path_matches_reference(tiny, kv_type, atol):
    """flash_attn=True: prefill (one shot and chunked) and decode. (On the CPU, F16 K/V in
    ggml's flash attention accumulate in F16: a looser bound than the mul_mat path.)"""
    _, _, model, ref = tiny
    W = model.hparams()["n_swa"]
    ids = _ids(3 * W + 5 + 16, model.n_vocab, seed=21)
    want = reference_logits(ref, ids)
    for n_batch in (512, 7):
        got = _ctx(model, kv_type=kv_type, n_batch=n_batch, logits_all=True, flash_attn=True).eval(ids)
        assert np.abs(got - want).max() < atol
    ctx = _ctx(model, kv_type=kv_type, flash_attn=True)
    out = [ctx.eval(ids[:3])[0]] + [ctx.eval([t])[0] for t in ids[3:]]
    assert np.abs(np.stack(out) - want[2:]).max() < atol


def test_state_moves_between_attention_paths(tiny12):
    """The state layout is canonical: V transposed (mul_mat path) or not (flash attention)."""
    _, _, model, _ = tiny12
    ids = _ids(40, model.n_vocab, seed=22)
    fa = _ctx(model, flash_attn=True)
    fa.eval(ids[:25])
    state = fa.save_state()
    a = fa.eval(ids[25:])
    mm = _ctx(model, flash_attn=False, n_batch=4)
    mm.load_state(state)
    np.testing.assert_allclose(mm.eval(ids[25:]), a, rtol=0, atol=1e-5)
    mm.load_state(mm.save_state())  # and back
    fa.load_state(mm.save_state())
    assert fa.n_past == mm.n_past


def test_threads_do_not_change_results(tiny12):
    _, _, model, _ = tiny12
    ids = _ids(20, model.n_vocab, seed=13)
    one = _ctx(model, logits_all=True)
    two = _ctx(model, logits_all=True, n_threads=2, n_threads_batch=2)
    np.testing.assert_allclose(two.eval(ids), one.eval(ids), rtol=0, atol=1e-5)
    np.testing.assert_allclose(two.eval([3]), one.eval([3]), rtol=0, atol=1e-5)


def test_yoco_on_off_equal_at_last_position(tiny12):
    _, _, model, ref = tiny12
    ids = _ids(40, model.n_vocab, seed=9)
    on = _ctx(model, yoco=True).eval(ids)
    off = _ctx(model, yoco=False).eval(ids)
    np.testing.assert_allclose(on, off, rtol=0, atol=1e-5)
    assert np.abs(on[0] - reference_logits(ref, ids)[-1]).max() < ATOL_F32


# ---------------------------------------------------------------------------------------------
# state, reset, memory


def test_save_continue_restore_continue_identical(tiny12):
    _, _, model, _ = tiny12
    ids = _ids(40, model.n_vocab, seed=2)
    ctx = _ctx(model)
    ctx.eval(ids[:25])
    state = ctx.save_state()
    assert isinstance(state, bytes)
    a = [ctx.eval([t])[0] for t in ids[25:]]
    ctx.load_state(state)
    assert ctx.n_past == 25
    b = [ctx.eval([t])[0] for t in ids[25:]]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    # another context of the same model, other n_ctx and n_batch (another SWA ring size)
    other = _ctx(model, n_ctx=64, n_batch=3)
    other.load_state(state)
    assert other.n_past == 25
    c = [other.eval([t])[0] for t in ids[25:]]
    np.testing.assert_allclose(np.stack(c), np.stack(a), rtol=0, atol=1e-5)


def test_load_state_rejects_foreign_states(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model)
    ctx.eval([1, 2, 3])
    state = ctx.save_state()
    with pytest.raises(StateError):
        ctx.load_state(b"not a state")
    with pytest.raises(StateError):
        ctx.load_state(state[:-1])
    with pytest.raises(StateError):
        _ctx(model, kv_type="f16").load_state(state)
    small = _ctx(model, n_ctx=2)
    with pytest.raises(ContextFullError):
        small.load_state(state)
    assert ctx.n_past == 3  # a failed load leaves the context as it was


def test_load_state_rejects_a_state_of_another_model_with_the_same_shapes(root, tiny12):
    # another seed: every layer shape and type is the same, only the weights differ
    _, path, model, _ = tiny12
    _, other_path = make_gguf(root, "tiny-12", "f32", seed=1)
    other = Model(other_path)
    shapes = lambda m: {k: v for k, v in m.hparams().items() if k != "diff_lambda"}  # noqa: E731 (λ are weights)
    assert shapes(other) == shapes(model)
    assert other.fingerprint != model.fingerprint
    ctx = _ctx(model)
    ctx.eval([1, 2, 3])
    state = ctx.save_state()
    foreign = _ctx(other)
    with pytest.raises(StateError, match="different model") as err:
        foreign.load_state(state)
    # the message names both files, never a bare number
    assert path.name in str(err.value) and other_path.name in str(err.value)
    assert foreign.n_past == 0
    _ctx(Model(path)).load_state(state)  # the same file loaded again has the same fingerprint


def test_load_state_names_kv_types(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model)
    ctx.eval([1, 2, 3])
    with pytest.raises(StateError, match="kv_type is f32 in the state, f16 here"):
        _ctx(model, kv_type="f16").load_state(ctx.save_state())


def test_load_state_checks_the_claimed_token_history(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model)
    ctx.eval([5, 6, 7])
    state = ctx.save_state()
    fresh = _ctx(model)
    with pytest.raises(StateError, match="3 positions.*2 tokens"):
        fresh.load_state(state, tokens=[5, 6])
    with pytest.raises(StateError, match="token history"):
        fresh.load_state(state, tokens=[5, 6, 8])
    assert fresh.n_past == 0
    fresh.load_state(state, tokens=[5, 6, 7])
    assert fresh.n_past == 3
    fresh.eval([9])
    fresh.load_state(fresh.save_state(), tokens=[5, 6, 7, 9])  # the history follows evals
    fresh.reset()
    fresh.eval([9])
    with pytest.raises(StateError, match="token history"):
        _ctx(model).load_state(fresh.save_state(), tokens=[5])  # and restarts with reset()


def test_reset_gives_a_fresh_sequence(tiny12):
    _, _, model, _ = tiny12
    ids = _ids(30, model.n_vocab, seed=4)
    fresh = _ctx(model).eval(ids)
    ctx = _ctx(model)
    ctx.eval(_ids(50, model.n_vocab, seed=8))
    ctx.reset()
    assert ctx.n_past == 0
    np.testing.assert_array_equal(ctx.eval(ids), fresh)


def test_memory_layout_and_breakdown(tiny12):
    """One full KV cache (the shared layer), SWA rings of W + n_batch - 1 cells, constant
    Mamba states; the cross layers own nothing."""
    _, _, model, _ = tiny12
    hp = model.hparams()
    kinds = hp["layer_types"]
    n_mamba, n_swa_layers = kinds.count("mamba"), kinds.count("attn_swa")
    assert kinds.count("attn_full") == 1 and kinds.count("attn_cross") >= 2
    n_embd_kv = hp["n_head_kv"] * hp["n_embd_head"]
    W = hp["n_swa"]
    for n_ctx, n_batch, kv, es in [(256, 32, "f16", 2), (1024, 32, "f16", 2), (256, 8, "f32", 4)]:
        mem = Context(model, n_ctx=n_ctx, n_batch=n_batch, kv_type=kv, **THREADS).memory_breakdown()
        assert mem["mamba_conv"] == n_mamba * (hp["d_conv"] - 1) * hp["d_inner"] * 4
        assert mem["mamba_ssm"] == n_mamba * hp["d_state"] * hp["d_inner"] * 4
        assert mem["swa_kv"] == n_swa_layers * 2 * (W + n_batch - 1) * n_embd_kv * es
        assert mem["full_kv"] == 2 * n_ctx * n_embd_kv * es
        assert mem["compute"] > 0 and mem["weights"] == model.weights_bytes


@pytest.mark.parametrize("kv_type, atol", [(None, 1.5e-3), ("bf16", 1e-2)])
def test_f16_bf16_kv_cache_within_tolerance(tiny12, kv_type, atol):
    _, _, model, ref = tiny12
    ids = _ids(53, model.n_vocab, seed=6)
    kw = {} if kv_type is None else {"kv_type": kv_type}  # default: f16
    ctx = Context(model, n_ctx=N_CTX, logits_all=True, **kw, **THREADS)
    err = np.abs(ctx.eval(ids) - reference_logits(ref, ids)).max()
    assert err < atol, f"{kv_type or 'f16'} KV: max |engine - reference| = {err:.3g}"


@pytest.mark.parametrize("outtype, atol", [("f16", 3e-3), ("bf16", 2e-2)])
def test_f16_bf16_weights_within_tolerance(tiny12, root, outtype, atol):
    hf_dir, _, _, ref = tiny12
    _, path = make_gguf(root, "tiny-12", outtype)
    model = Model(path)
    ids = _ids(53, model.n_vocab, seed=6)
    got = _ctx(model, logits_all=True).eval(ids)
    err = np.abs(got - reference_logits(ref, ids)).max()
    assert err < atol, f"{outtype} weights: max |engine - reference| = {err:.3g}"


def test_bf16_checkpoint_matches_its_reference(root):
    """A bf16 checkpoint converted to a BF16 GGUF against the reference of the same weights."""
    hf_dir, path = make_gguf(root, "tiny-12", "bf16", dtype="bfloat16")
    model = Model(path)
    ref = NumpyReference.from_folder(hf_dir)
    ids = _ids(40, model.n_vocab, seed=12)
    err = np.abs(_ctx(model, logits_all=True).eval(ids) - reference_logits(ref, ids)).max()
    assert err < 1.5e-2, f"bf16 checkpoint: max |engine - reference| = {err:.3g}"


# ---------------------------------------------------------------------------------------------
# API surface


def test_model_reports_hparams_metadata_and_device(tiny12):
    _, path, model, ref = tiny12
    hp = model.hparams()
    assert hp["n_layer"] == 12 and hp["memory_layer"] == 6 and hp["kv_shared_layer"] == 7
    assert hp["layer_types"][6:8] == ["mamba", "attn_full"]
    meta = model.metadata()
    assert meta["general.architecture"] == "phi4flash"
    assert len(meta["tokenizer.ggml.tokens"]) == model.n_vocab
    assert isinstance(meta["tokenizer.huggingface.json"], str)
    assert "<|assistant|>" in meta["tokenizer.chat_template"]
    assert model.metadata_value("tokenizer.ggml.model") == "gpt2"
    assert model.metadata_value("no.such.key", 42) == 42
    assert model.device == "CPU" and model.mmapped
    assert Model(path, device="cpu", use_mmap=False).mmapped is False


def test_eval_of_nothing_and_output_shapes(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model)
    assert ctx.eval([]).shape == (0, model.n_vocab)
    assert ctx.eval(np.array([1, 2, 3], dtype=np.int32)).shape == (1, model.n_vocab)
    assert ctx.n_past == 3


def test_invalid_token_ids_raise_before_compute(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model)
    ctx.eval([5])
    for bad in ([1, -1], [model.n_vocab], [2**32]):
        with pytest.raises(ValueError, match="invalid token id") as from_eval:
            ctx.eval(bad)
        with pytest.raises(ValueError) as from_check:
            ctx.check_tokens(bad)  # the same check, for callers that split their tokens
        with pytest.raises(ValueError) as from_decode:
            ctx.decode([(0, bad)])
        assert str(from_eval.value) == str(from_check.value) == str(from_decode.value)
    assert str(from_check.value) == f"invalid token id {2**32} at index 0 (n_vocab is {model.n_vocab})"
    with pytest.raises(TypeError):
        ctx.check_tokens([1.5])
    ctx.check_tokens([0, model.n_vocab - 1])
    assert ctx.n_past == 1


def test_tokens_must_be_integers(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model)
    with pytest.raises(TypeError):
        ctx.eval([1.5, 2.0])
    with pytest.raises(ValueError):
        ctx.eval([[1, 2], [3, 4]])
    assert ctx.n_past == 0
    assert ctx.eval(np.array([1, 2], dtype=np.uint16)).shape == (1, model.n_vocab)


def test_context_smaller_than_the_window(tiny12):
    _, _, model, ref = tiny12
    W = model.hparams()["n_swa"]
    ids = _ids(W // 2 + 2, model.n_vocab, seed=14)
    ctx = _ctx(model, n_ctx=len(ids), n_batch=3, logits_all=True)
    got = np.concatenate([ctx.eval(ids[:5]), ctx.eval(ids[5:])])
    assert np.abs(got - reference_logits(ref, ids)).max() < ATOL_F32
    with pytest.raises(ContextFullError):
        ctx.eval([1])


def test_exceeding_n_ctx_raises_context_full(tiny12):
    _, _, model, _ = tiny12
    ctx = _ctx(model, n_ctx=32, n_batch=8)
    ctx.eval(list(range(30)))
    with pytest.raises(ContextFullError, match="33.*32") as info:
        ctx.eval([1, 2, 3])
    assert info.value.n_requested == 33 and info.value.n_ctx == 32
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    assert str(info.value) == "Requested tokens (33) exceed context window of 32"
    with pytest.raises(ContextFullError, match=r"^Requested tokens \(34\) exceed context window of 32$"):
        ctx.check_fits(34)  # the same check, for callers that split one sequence
    ctx.check_fits(32)
    assert ctx.n_past == 30
    ctx.eval([1, 2])  # exactly full is fine
    assert ctx.n_past == 32


def test_bad_context_arguments(tiny12):
    _, _, model, _ = tiny12
    with pytest.raises(ValueError):
        Context(model, kv_type="q4")
    with pytest.raises(ValueError):
        Context(model, n_batch=0)
    with pytest.raises(ValueError, match="n_ctx"):
        Context(model, n_ctx=2**30)


def test_quantized_q8_0_model_runs_close_to_reference(tiny12, root):
    """A Q8_0 file from sambay.quantize (quantized matmuls, Q8_0 embedding via get_rows)."""
    from sambay.quantization import quantize

    _, path, _, ref = tiny12
    q8 = root / "tiny-12-q8_0.gguf"
    if not q8.exists():
        quantize(path, q8, "Q8_0", n_threads=2, progress=False)
    model = Model(q8)
    ids = _ids(53, model.n_vocab, seed=6)
    got = _ctx(model, logits_all=True).eval(ids)
    want = reference_logits(ref, ids)
    err = np.abs(got - want).max()
    assert err < 6e-2, f"Q8_0: max |engine - reference| = {err:.3g}"
    # relative mean-squared error stays small
    assert np.mean((got - want) ** 2) / np.mean(want**2) < 1e-3
    # the CPU's repacked Q8_0 layout (default) computes what the plain mapped layout computes,
    # up to the order of its sums: 9.7e-3 apart on an Armv8.2 dotprod+fp16 build (its 4x4
    # interleaved kernel; emulated Cortex-A76), equal on x86-64 (wheel and native); a wrong layout is O(1)
    plain = _ctx(Model(q8, use_extra_bufts=False), logits_all=True).eval(ids)
    np.testing.assert_allclose(got, plain, rtol=0, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# no torch needed


def test_engine_tests_run_without_torch():
    """With torch unimportable, this file collects and its parity tests pass (a Raspberry Pi's
    test install has no torch: pyproject.toml's test extra)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; import pytest; "
            "sys.exit(pytest.main(sys.argv[1:]))")
    out = subprocess.run(
        [sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", __file__,
         "-k", "greedy_generation or bf16_checkpoint or (prefill_all_positions and 3W)"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_python_reads_the_layer_kinds_and_architecture_from_the_engine(tiny12):
    from sambay.convert.metadata import ARCH as CONVERT_ARCH
    from sambay.convert.schedule import LayerKind
    from sambay.engine import ARCH, LAYER_KINDS

    _, _, model, _ = tiny12
    stored = model.metadata_value(f"{ARCH}.layer_types")
    assert [LayerKind(v).label for v in stored] == model.hparams()["layer_types"]
    assert [LAYER_KINDS[v] for v in stored] == model.hparams()["layer_types"]
    assert model.metadata_value("general.architecture") == ARCH == CONVERT_ARCH
