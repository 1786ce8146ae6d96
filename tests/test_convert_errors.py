"""Bad input to sambay.convert: a ConvertError with a useful one-line message, and no output.

Also the command line: ``sambay convert`` and ``python -m sambay.convert`` (exit codes, messages).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sambay import cli
from sambay.convert import ConvertError, ConvertWarning, convert, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny.write_checkpoint(tmp_path_factory.mktemp("base") / "ck", "tiny-8", seed=3)


@pytest.fixture
def ck(base, tmp_path) -> Path:
    """A fresh writable copy of the tiny-8 f32 single-file checkpoint."""
    return Path(shutil.copytree(base, tmp_path / "ck"))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def fails(src, out_dir: Path, match: str, **kw) -> str:
    """Convert, expect a ConvertError matching ``match``, and no file left in ``out_dir``."""
    with pytest.raises(ConvertError, match=match) as info:
        convert(src, out_dir / "m.gguf", progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert list(out_dir.iterdir()) == [], "a failed conversion left a file behind"
    return msg


def edit_config(ck: Path, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ck / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


def edit_tensors(ck: Path, drop=(), put=None) -> None:
    t = load_file(str(ck / "model.safetensors"))
    for name in drop:
        del t[name]
    t.update(put or {})
    save_file(t, str(ck / "model.safetensors"), metadata={"format": "pt"})


def rewrite_header(ck: Path, edit) -> None:
    """Replace the safetensors header by edit(header_dict) (or raw bytes), keeping the data."""
    path = ck / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    new = edit(header)
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


# ---------------------------------------------------------------------------------------------
# paths and config


def test_missing_folder(tmp_path, out_dir):
    fails(tmp_path / "nope", out_dir, "no such folder")


def test_path_is_a_file(ck, out_dir):
    fails(ck / "config.json", out_dir, "not a folder")


def test_no_config(ck, out_dir):
    (ck / "config.json").unlink()
    fails(ck, out_dir, "no config.json")


def test_config_not_json(ck, out_dir):
    (ck / "config.json").write_text("{not json")
    fails(ck, out_dir, "config.json: cannot parse")


def test_other_architecture(ck, out_dir):
    edit_config(ck, architectures=["LlamaForCausalLM"], model_type="llama")
    fails(ck, out_dir, r"not a Phi-4-mini-flash.*LlamaForCausalLM")


def test_model_type_alone_is_enough(ck, out_dir):
    edit_config(ck, architectures=_DELETE)
    convert(ck, out_dir / "m.gguf", progress=False)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"num_attention_heads": 2, "num_key_value_heads": 1}, "even head counts"),
        ({"num_attention_heads": 8, "num_key_value_heads": 6}, "does not divide"),
        ({"hidden_size": 66, "num_attention_heads": 4}, "not divisible"),
        ({"num_hidden_layers": 6}, "multiple of 4"),
        ({"mb_per_layer": 3}, "mb_per_layer"),
        ({"num_key_value_heads": "2"}, "must be an integer"),
        ({"intermediate_size": _DELETE}, "missing key 'intermediate_size'"),
        ({"sliding_window": None}, "sliding_window"),
        ({"sliding_window": [None, 8, None, 8, None, 8, None, None]}, r"sliding_window\[5\]"),
        ({"sliding_window": [None, 8, None, 4, None, None, None, None]}, "one sliding_window"),
        ({"layer_types": ["full_attention"] * 8}, r"layer_types\[1\]"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"layer_norm_eps": -1}, "layer_norm_eps"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_config(ck, out_dir, changes, match):
    edit_config(ck, **changes)
    fails(ck, out_dir, match)


# ---------------------------------------------------------------------------------------------
# tensors


def test_missing_tensors_are_all_listed(ck, out_dir):
    gone = [
        "model.layers.0.attn.A_log",
        "model.layers.5.attn.inner_cross_attn.lambda_q1",
        "model.final_layernorm.bias",
    ]
    edit_tensors(ck, drop=gone)
    msg = fails(ck, out_dir, "missing 3 tensor")
    assert all(n in msg for n in gone)


def test_unexpected_tensors_are_all_listed(ck, out_dir):
    extra = {
        "model.layers.0.attn.bogus": np.zeros(3, np.float32),
        "model.layers.8.mlp.fc1.weight": np.zeros((2, 2), np.float32),
    }
    edit_tensors(ck, put=extra)
    msg = fails(ck, out_dir, "unexpected 2 tensor")
    assert all(n in msg for n in extra)


def test_missing_and_unexpected_together(ck, out_dir):
    edit_tensors(
        ck, drop=["model.layers.1.attn.Wqkv.bias"], put={"extra.weight": np.zeros(2, np.float32)}
    )
    msg = fails(ck, out_dir, "missing 1 tensor")
    assert "model.layers.1.attn.Wqkv.bias" in msg and "unexpected 1 tensor(s): extra.weight" in msg


def test_shape_mismatch(ck, out_dir):
    edit_tensors(ck, put={"model.layers.3.attn.Wqkv.weight": np.zeros((100, 64), np.float32)})
    fails(
        ck,
        out_dir,
        r"shape mismatch: model\.layers\.3\.attn\.Wqkv\.weight expected \[128, 64\] found \[100, 64\]",
    )


def test_unsupported_dtype(ck, out_dir):
    edit_tensors(ck, put={"model.layers.0.attn.D": np.zeros(128, np.int64)})
    fails(ck, out_dir, r"unsupported dtype.*model\.layers\.0\.attn\.D \(I64\)")


def test_lm_head_different_from_embedding(ck, out_dir):
    edit_tensors(ck, put={"lm_head.weight": np.ones((640, 64), np.float32)})
    fails(ck, out_dir, "lm_head.weight differs")


def test_untied_config_needs_lm_head(ck, out_dir):
    edit_config(ck, tie_word_embeddings=False)
    fails(ck, out_dir, "missing 1 tensor.*lm_head.weight")


# ---------------------------------------------------------------------------------------------
# corrupt safetensors


def test_header_not_json(ck, out_dir):
    rewrite_header(ck, lambda h: b"{" + b"x" * 30)
    fails(ck, out_dir, "corrupt safetensors header")


def test_header_length_past_end(ck, out_dir):
    path = ck / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    fails(ck, out_dir, "corrupt safetensors header length")


def test_file_shorter_than_length_field(ck, out_dir):
    (ck / "model.safetensors").write_bytes(b"\x01\x02")
    fails(ck, out_dir, "truncated safetensors file")


def test_truncated_data(ck, out_dir):
    path = ck / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    fails(ck, out_dir, "truncated")


def test_trailing_bytes(ck, out_dir):
    path = ck / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    fails(ck, out_dir, "trailing bytes")


def test_unknown_dtype_in_header(ck, out_dir):
    def edit(h):
        h["model.layers.0.attn.D"]["dtype"] = "F99"
        return h

    rewrite_header(ck, edit)
    fails(ck, out_dir, "unknown dtype 'F99'")


def test_offsets_that_do_not_fit_the_shape(ck, out_dir):
    def edit(h):
        b, e = h["model.layers.0.attn.D"]["data_offsets"]
        h["model.layers.0.attn.D"]["data_offsets"] = [b, e + 4]
        return h

    rewrite_header(ck, edit)
    fails(ck, out_dir, r"model\.layers\.0\.attn\.D F32\[128\] needs 512 bytes")


def test_overlapping_offsets(ck, out_dir):
    def edit(h):
        a, b = h["model.layers.0.attn.D"], h["model.layers.0.attn.conv1d.bias"]
        b["data_offsets"] = list(a["data_offsets"])  # same size ([128] f32): same bytes twice
        return h

    rewrite_header(ck, edit)
    fails(ck, out_dir, "corrupt data_offsets: tensor .* (overlaps another tensor|leaves a gap)")


def test_offsets_outside_the_file(ck, out_dir):
    def edit(h):
        t = h["model.final_layernorm.bias"]
        size = t["data_offsets"][1] - t["data_offsets"][0]
        t["data_offsets"] = [10**9, 10**9 + size]
        return h

    rewrite_header(ck, edit)
    fails(ck, out_dir, "corrupt data_offsets")


def test_bad_shape_in_header(ck, out_dir):
    def edit(h):
        h["model.layers.0.attn.D"]["shape"] = [-1]
        return h

    rewrite_header(ck, edit)
    fails(ck, out_dir, "bad shape")


def test_no_safetensors(ck, out_dir):
    (ck / "model.safetensors").unlink()
    fails(ck, out_dir, r"no \*\.safetensors")


def test_index_names_a_missing_shard(tmp_path, out_dir):
    ck = tiny.write_checkpoint(tmp_path / "sh", "tiny-8", sharded=True)
    (ck / "model-00002-of-00002.safetensors").unlink()
    fails(ck, out_dir, "missing shard file.*model-00002-of-00002")


def test_index_disagrees_with_shards(tmp_path, out_dir):
    ck = tiny.write_checkpoint(tmp_path / "sh", "tiny-8", sharded=True)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(ck, out_dir, "not in the shard it names: model.embed_tokens.weight")


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_missing_tokenizer(ck, out_dir):
    (ck / "tokenizer.json").unlink()
    fails(ck, out_dir, r"no tokenizer.*--no-tokenizer")


def test_missing_tokenizer_allowed(ck, out_dir):
    import gguf

    (ck / "tokenizer.json").unlink()
    out = convert(ck, out_dir / "m.gguf", allow_missing_tokenizer=True, progress=False)
    fields = gguf.GGUFReader(str(out)).fields
    assert not [k for k in fields if k.startswith("tokenizer.")]
    assert fields["phi4flash.vocab_size"].contents() == 640


def test_broken_tokenizer_json(ck, out_dir):
    (ck / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    fails(ck, out_dir, "tokenizer.json")


def test_tokenizer_larger_than_vocab(ck, out_dir):
    edit_config(ck, vocab_size=300)
    edit_tensors(ck, put={"model.embed_tokens.weight": np.zeros((300, 64), np.float32)})
    fails(ck, out_dir, "vocab_size is 300")


# ---------------------------------------------------------------------------------------------
# output


def test_output_folder_missing(ck, tmp_path):
    with pytest.raises(ConvertError, match="output folder does not exist"):
        convert(ck, tmp_path / "no" / "m.gguf", progress=False)


def test_output_is_a_folder(ck, out_dir):
    with pytest.raises(ConvertError, match="is a folder"):
        convert(ck, out_dir, progress=False)


def test_bad_outtype(ck, out_dir):
    fails(ck, out_dir, "outtype must be", outtype="q8_0")


def test_failure_while_writing_leaves_old_file_and_no_temp(ck, out_dir, monkeypatch):
    from sambay.convert import pipeline

    out = out_dir / "m.gguf"
    out.write_bytes(b"previous")
    real, calls = pipeline.read_tensor, []

    def flaky(entry):
        calls.append(entry.name)
        if len(calls) == 40:
            raise ConvertError(f"simulated read failure at {entry.name}")
        return real(entry)

    monkeypatch.setattr(pipeline, "read_tensor", flaky)
    with pytest.raises(ConvertError, match="simulated"):
        convert(ck, out, progress=False)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]


def test_interrupt_while_writing_removes_temp(ck, out_dir, monkeypatch):
    from sambay.convert import pipeline

    def interrupted(entry, max_bytes):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "iter_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(ck, out_dir / "m.gguf", progress=False)
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# values: NaN, Inf, F16 overflow (warned, or refused with strict)


def _poison(ck: Path, name: str, **cells) -> None:
    t = load_file(str(ck / "model.safetensors"))
    arr = t[name].copy()
    for where, value in cells.items():
        arr.flat[int(where[1:])] = value
    edit_tensors(ck, put={name: arr})


def test_nan_and_inf_weights_warn_and_strict_refuses(ck, out_dir):
    _poison(ck, "model.layers.0.mlp.fc2.weight", i0=np.nan, i7=np.inf, i9=-np.inf)
    _poison(ck, "model.layers.0.attn.A_log", i3=np.nan)  # a transformed tensor (A = -exp)
    with pytest.warns(ConvertWarning) as caught:
        convert(ck, out_dir / "m.gguf", progress=False)
    assert [str(w.message) for w in caught] == [
        "model.layers.0.mlp.fc2.weight (blk.0.ffn_down.weight): 1 NaN and 2 Inf value(s) in the checkpoint",
        "model.layers.0.attn.A_log (blk.0.ssm_a): 1 NaN and 0 Inf value(s) in the checkpoint",
        "2 tensor(s) hold NaN or Inf: the model will likely produce garbage; strict conversion "
        "(--strict) refuses such a checkpoint",
    ]
    (out_dir / "m.gguf").unlink()
    msg = fails(ck, out_dir, "refusing to convert", strict=True)
    assert msg == ("model.layers.0.mlp.fc2.weight (blk.0.ffn_down.weight): 1 NaN and 2 Inf value(s) "
                   "in the checkpoint; refusing to convert (strict)")


def test_f16_overflow_warns_only_for_f16(ck, out_dir):
    _poison(ck, "model.embed_tokens.weight", i5=70000.0, i6=-1e9, i8=65504.0)
    with pytest.warns(ConvertWarning) as caught:
        convert(ck, out_dir / "m.gguf", outtype="f16", progress=False)
    assert str(caught[0].message) == (
        "model.embed_tokens.weight (token_embd.weight): 2 value(s) beyond F16's range "
        "(|x| > 65504) written as Inf (--outtype bf16 or f32 holds them)")
    assert len(caught) == 2
    for outtype in ("f32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            convert(ck, out_dir / f"{outtype}.gguf", outtype=outtype, progress=False, strict=True)


def test_clean_checkpoint_converts_without_warnings(ck, out_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(ck, out_dir / "m.gguf", outtype="f16", progress=False, strict=True)


def test_cli_warnings_and_strict(ck, out_dir, capsys):
    _poison(ck, "model.layers.2.mlp.fc1.weight", i1=np.nan)
    assert cli.main(["convert", str(ck), str(out_dir / "m.gguf"), "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("sambay convert: warning: model.layers.2.mlp.fc1.weight (blk.2.ffn_up.weight): "
                      "1 NaN and 0 Inf value(s) in the checkpoint")
    assert err[1].startswith("sambay convert: warning: 1 tensor(s) hold NaN or Inf") and len(err) == 2
    assert cli.main(["convert", str(ck), str(out_dir / "s.gguf"), "-q", "--strict"]) == 1
    assert capsys.readouterr().err.startswith("sambay convert: error: model.layers.2.mlp.fc1.weight")
    assert not (out_dir / "s.gguf").exists()


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_success_and_error(ck, out_dir, capsys):
    assert cli.main(["convert", str(ck), str(out_dir / "m.gguf"), "--outtype", "f16", "-q"]) == 0
    assert (out_dir / "m.gguf").read_bytes()[:4] == b"GGUF"
    capsys.readouterr()

    edit_tensors(ck, drop=["model.layers.2.attn.D"])
    assert cli.main(["convert", str(ck), str(out_dir / "bad.gguf"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sambay convert: error: missing 1 tensor(s): model.layers.2.attn.D"
    assert not (out_dir / "bad.gguf").exists()


def test_cli_no_tokenizer_flag(ck, out_dir, capsys):
    (ck / "tokenizer.json").unlink()
    assert cli.main(["convert", str(ck), str(out_dir / "m.gguf"), "-q"]) == 1
    assert "--no-tokenizer" in capsys.readouterr().err
    assert cli.main(["convert", str(ck), str(out_dir / "m.gguf"), "-q", "--no-tokenizer"]) == 0


def test_python_dash_m_sambay_convert(ck, out_dir):
    ok = subprocess.run(
        [sys.executable, "-m", "sambay.convert", str(ck), str(out_dir / "m.gguf"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (out_dir / "m.gguf").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "sambay.convert", str(ck / "nope"), str(out_dir / "x.gguf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("sambay convert: error: ")
    assert "no such folder" in bad.stderr


# ---------------------------------------------------------------------------------------------
# hostile headers and interruption (issue 8)


@pytest.mark.parametrize("edit, match", [
    (lambda h: b"[" * 200_000 + b"]" * 200_000, "corrupt safetensors header"),  # RecursionError
    (lambda h: b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}', "bad data_offsets"),
    (lambda h: b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 18446744073709551623]}}',
     "needs 8 bytes"),
    (lambda h: b'{"a": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 8]}}', "needs"),
    (lambda h: b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "bad shape"),
    (lambda h: b'{"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}', "bad shape"),
    (lambda h: b'{"a": {"dtype": "__class__", "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
    (lambda h: b'{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
    (lambda h: b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [true, 8]}}', "bad data_offsets"),
    (lambda h: b'{"a": 5}', "corrupt header entry"),
    (lambda h: b'"just a string"', "not a JSON object"),
    (lambda h: b"\xff\xfe{}", "not JSON"),
])
def test_hostile_safetensors_headers(ck, out_dir, edit, match):
    rewrite_header(ck, edit)
    fails(ck, out_dir, match)


def test_kill_9_mid_write_leaves_no_valid_looking_file(ck, tmp_path):
    """SIGKILL while the GGUF is being written: the output name never exists (the data goes to a
    temporary name that os.replace publishes only when complete), and what is left under the
    temporary name is rejected by the loader as truncated."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    out.mkdir()
    code = (
        "import sys, time\n"
        "import sambay.convert.writer as w\n"
        "n = [0]\n"
        "def slow(x):\n"  # the writer's memoryview: called once per chunk written
        "    n[0] += 1\n"
        "    if n[0] == 20:\n"
        "        print('writing', flush=True); time.sleep(60)\n"
        "    return memoryview(x)\n"
        "w.memoryview = slow\n"
        "from sambay.convert import convert\n"
        "convert(sys.argv[1], sys.argv[2], outtype='f32', progress=False)\n"
    )
    root = tmp_path
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", code, str(ck), str(out / "m.gguf")],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "m.gguf").exists()
    left = list(out.iterdir())
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in left), left
    from sambay.engine import LoadError, Model

    for p in left:
        with pytest.raises(LoadError, match="truncated|beyond the end|cannot parse"):
            Model(p)
