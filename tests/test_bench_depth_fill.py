"""bench/depth_fill.py puts an engine at a context depth by writing a saved state of that many
positions. These checks use sambay's demo model; the llama.cpp side (which needs
llama-cpp-python) is checked for writer/parser agreement on a hand-made state."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import sambay
from sambay.engine import Context, Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`
from bench import depth_fill  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return Model(sambay.demo_model_path())


def test_sambay_rebuild_matches_saved_state(model):
    hp = model.hparams()
    for n in (3, hp["n_swa"] + 5):  # below and above the sliding window
        ctx = Context(model, n_ctx=64, n_threads=1)
        ctx.eval(list(range(10, 10 + n)))
        real = ctx.save_state()
        depth_fill.check_sambay(real, hp)
        fake = depth_fill.sambay_state(real, hp, n)
        assert len(fake) == len(real)
        with pytest.raises(ValueError):
            depth_fill.check_sambay(real[:-1], hp)


def test_sambay_filled_state_puts_the_context_at_depth(model):
    hp = model.hparams()
    ctx = Context(model, n_ctx=256, n_threads=1)
    ctx.eval([5, 6, 7, 8])
    fake = depth_fill.sambay_state(ctx.save_state(), hp, 200)
    ctx.reset()
    ctx.load_state(fake.tobytes())  # the engine's own size and header checks accept it
    assert ctx.n_past == 200
    logits = ctx.eval([9])
    assert ctx.n_past == 201 and np.isfinite(logits).all()


def _llama_state(cells: int, n_layer: int, row: int, v_trans: int) -> bytes:
    """A one-sequence llama.cpp state as llama_state_seq_get_data writes it, random values."""
    rng = np.random.default_rng(0)
    b = struct.pack("<Ii", 0xAF143CD8, 0) + struct.pack("<II", 1, cells)
    b += b"".join(struct.pack("<iIi", p, 1, 0) for p in range(cells))
    b += struct.pack("<II", v_trans, n_layer)
    for _ in range(n_layer):
        b += struct.pack("<iQ", 1, row) + rng.bytes(cells * row)
    for _ in range(n_layer):
        if v_trans:
            b += struct.pack("<iII", 1, 2, row // 2) + rng.bytes(cells * row)
        else:
            b += struct.pack("<iQ", 1, row) + rng.bytes(cells * row)
    return b


@pytest.mark.parametrize("v_trans", [0, 1])
def test_llamacpp_rebuild_agrees_with_the_parser(v_trans):
    real = _llama_state(cells=7, n_layer=3, row=64, v_trans=v_trans)
    depth_fill.check_llamacpp(real)
    deep = depth_fill.llamacpp_state(real, 1000)
    p = depth_fill._parse_llamacpp(deep.tobytes())
    assert p["cells"] == 1000 and p["n_layer"] == 3 and p["v_trans"] == v_trans
    assert len(deep) == len(real) + (1000 - 7) * (12 + 2 * 3 * 64)
    with pytest.raises(ValueError):
        depth_fill.check_llamacpp(real + b"\0")


@pytest.mark.parametrize("n_stream", [2, 5])
def test_llamacpp_state_for_per_sequence_streams(n_stream):
    # a context with a KV stream per sequence takes only states with its own stream count: the
    # cells in one stream, the others empty (a cell count of 0 each)
    real = _llama_state(cells=7, n_layer=2, row=32, v_trans=1)
    deep = depth_fill.llamacpp_state(real, 40, n_stream=n_stream)
    p = depth_fill._parse_llamacpp(deep.tobytes())
    assert p["n_stream"] == n_stream and p["cells"] == 40 and p["n_layer"] == 2
    assert len(deep) == len(depth_fill.llamacpp_state(real, 40)) + 4 * (n_stream - 1)
    assert struct.unpack_from("<II", deep.tobytes(), 8) == (n_stream, 40)
    assert struct.unpack_from(f"<{n_stream - 1}I", deep.tobytes(), len(deep) - 4 * (n_stream - 1)) == (0,) * (n_stream - 1)
    # the parser refuses a stream count that does not match the streams present
    broken = bytearray(deep.tobytes())
    struct.pack_into("<I", broken, 8, n_stream + 1)
    with pytest.raises(ValueError):
        depth_fill._parse_llamacpp(bytes(broken))
