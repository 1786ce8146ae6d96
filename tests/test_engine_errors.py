"""Bad GGUF files reach Python as sambay.engine.LoadError (a ValueError), never a crash."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
from engine_helpers import rewrite_gguf
from sambay.engine import Context, LoadError, Model


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_gguf):
    """(a folder for broken copies, the shared tiny-8 f32 GGUF)"""
    _, path = tiny_gguf("tiny-8")
    return tmp_path_factory.mktemp("engine-errors"), path


def _load_fails(path, *patterns):
    with pytest.raises(LoadError) as info:
        Model(path)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def test_load_error_is_a_value_error():
    assert issubclass(LoadError, ValueError)


def test_good_file_loads(good):
    _, path = good
    m = Model(path)
    assert Context(m, n_ctx=16, n_threads=1).eval([1, 2]).shape == (1, m.n_vocab)


def test_missing_file(tmp_path):
    _load_fails(tmp_path / "nope.gguf", "cannot open")


def test_directory_instead_of_file(tmp_path):
    _load_fails(tmp_path, "not a regular file")


@pytest.mark.parametrize("content", [b"", b"GG", b"GGML" + bytes(100), b"\x00" * 4096])
def test_wrong_magic(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    _load_fails(p, "not a GGUF file")


@pytest.mark.parametrize("frac", [0.01, 0.3, 0.999])
def test_truncated_file(good, tmp_path, frac):
    _, path = good
    data = path.read_bytes()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(LoadError, match="truncated|beyond the end"):
        Model(p)


def test_garbage_after_magic(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _load_fails(p, "GGUF")


def test_other_architecture(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _load_fails(p, "unsupported architecture 'llama'")


def test_renamed_architecture(good):
    root, path = good
    _load_fails(rewrite_gguf(path, root / "arch.gguf", arch="phi3"), "unsupported architecture 'phi3'")


def test_missing_tensor(good):
    root, path = good
    bad = rewrite_gguf(path, root / "missing.gguf", drop_tensors=["blk.5.attn_qkv.weight", "output_norm.bias"])
    _load_fails(bad, "missing tensor 'blk.5.attn_qkv.weight'", "missing tensor 'output_norm.bias'")


def test_wrong_shape(good):
    root, path = good
    bad = rewrite_gguf(path, root / "shape.gguf", tensor_fn={"blk.2.ssm_conv1d.weight": lambda w: w[:, :3]})
    _load_fails(bad, "blk.2.ssm_conv1d.weight", "expected")


def test_inconsistent_hparam(good):
    root, path = good
    bad = rewrite_gguf(path, root / "hp.gguf", set_kv={"phi4flash.embedding_length": lambda v: v + 1})
    _load_fails(bad, "token_embd.weight", "expected")


def test_absurd_sizes(good):
    root, path = good
    bad = rewrite_gguf(path, root / "absurd.gguf", set_kv={"phi4flash.ssm.inner_size": lambda v: 2**31})
    _load_fails(bad, "inner_size", "out of range")
    bad = rewrite_gguf(path, root / "absurd2.gguf", set_kv={"phi4flash.block_count": lambda v: 10**9})
    _load_fails(bad, "block_count")


def test_missing_key(good):
    root, path = good
    bad = rewrite_gguf(path, root / "nokey.gguf", drop_kv=["phi4flash.attention.diff_lambda", "phi4flash.ssm.state_size"])
    _load_fails(bad, "diff_lambda", "ssm.state_size")


def test_wrong_key_type(good):
    root, path = good
    p = root / "keytype.gguf"
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(p, "phi4flash")
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "phi4flash.block_count":
            w.add_string(name, "eight")
            continue
        w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _load_fails(p, "block_count", "expected an unsigned integer")


def test_schedule_that_is_not_sambay(good):
    root, path = good

    def swap(kinds):
        kinds = list(kinds)
        kinds[-1], kinds[0] = kinds[0], kinds[-1]  # a mamba layer in the cross-decoder
        return kinds

    _load_fails(rewrite_gguf(path, root / "sched.gguf", set_kv={"phi4flash.layer_types": swap}), "schedule")


def test_heads_must_be_deinterleaved(good):
    root, path = good
    bad = rewrite_gguf(path, root / "inter.gguf", set_kv={"phi4flash.attention.heads_deinterleaved": lambda v: False})
    _load_fails(bad, "heads_deinterleaved")


def test_wrong_tensor_type(good):
    root, path = good
    p = root / "ttype.gguf"
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(p, "phi4flash")
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        data = np.array(t.data).reshape([int(x) for x in reversed(t.shape)])
        if t.name == "blk.0.ssm_a":
            data = data.astype(np.float16)  # must stay F32
        w.add_tensor(t.name, data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _load_fails(p, "blk.0.ssm_a", "expected F32")


def test_unknown_device(good):
    _, path = good
    with pytest.raises(LoadError, match="no ggml device"):
        Model(path, device="NoSuchGPU0")


def test_unsupported_gguf_version_says_why(good, tmp_path):
    _, path = good
    data = bytearray(path.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    p = tmp_path / "v9.gguf"
    p.write_bytes(bytes(data))
    _load_fails(p, "cannot parse the GGUF header", "version 9")
