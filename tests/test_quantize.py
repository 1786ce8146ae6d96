"""sambay.quantize: per-tensor type rules, data fidelity, metadata, atomic output, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

import sambay.quantization as sq
from sambay.engine import LoadError, Model
from sambay.quantization import QUANT_TYPES, QuantizeError, quantize

N_LAYER = 8
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "gguf_regressions"


def _write_gguf(path, arch="phi4flash", tensors=None, quantized=False):
    """A small phi4flash-shaped GGUF: the quantizer only reads names, shapes and data."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYER)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_array("phi4flash.layer_types", [0, 1, 0, 1, 0, 2, 3, 4])
    if tensors is None:
        tensors = {
            "token_embd.weight": rng.standard_normal((64, 256)),
            "output_norm.weight": rng.standard_normal(256),
            "blk.0.attn_norm.weight": rng.standard_normal(256),
            "blk.0.ssm_in.weight": rng.standard_normal((1024, 256)),
            "blk.0.ssm_conv1d.weight": rng.standard_normal((512, 4)),
            "blk.0.ssm_dt.weight": rng.standard_normal((512, 16)),  # ne0 = dt_rank = 16
            "blk.0.ssm_dt.bias": rng.standard_normal(512),
            "blk.0.ssm_a": -np.exp(rng.standard_normal((512, 16))),
            "blk.0.ffn_down.weight": rng.standard_normal((256, 512)),
            "blk.3.ffn_down.weight": rng.standard_normal((256, 512)),
            "blk.1.attn_qkv.weight": rng.standard_normal((512, 256)),
            "blk.1.attn_output.weight": rng.standard_normal((256, 256)),
            "blk.1.attn_sub_norm.weight": rng.standard_normal(64),
            "blk.6.gmu_in.weight": rng.standard_normal((512, 256)),
        }
    for name, arr in tensors.items():
        arr = np.asarray(arr, dtype=np.float32)
        if quantized and arr.ndim == 2 and arr.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _read(path):
    r = gguf.GGUFReader(str(path))
    out = {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type).reshape(
        [int(x) for x in reversed(t.shape)])) for t in r.tensors}
    return r, out


def _type_of(ftype, name, ne0, i_layer=-1, n_dims=2):
    return sq._core.quantize_tensor_type(ftype, name, n_dims, ne0, "f32", i_layer, N_LAYER)


def test_supported_types():
    for t in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M",
              "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"):
        assert t in QUANT_TYPES


def test_rules_keep_small_and_sensitive_tensors():
    for ft in ("Q4_0", "Q4_K_M", "Q8_0", "F16"):
        assert _type_of(ft, "blk.0.attn_norm.weight", 256, 0, n_dims=1) == "f32"
        assert _type_of(ft, "blk.0.ssm_a", 16, 0) == "f32"  # no ".weight": a constant
        assert _type_of(ft, "blk.0.ssm_conv1d.weight", 4, 0) == "f32"
        assert _type_of(ft, "blk.0.ssm_dt.bias", 512, 0, n_dims=1) == "f32"


def test_rules_follow_llama_quantize():
    # tied embedding = output projection
    assert _type_of("Q4_K_M", "token_embd.weight", 2560) == "q6_K"
    assert _type_of("Q4_0", "token_embd.weight", 2560) == "q6_K"
    assert _type_of("Q8_0", "token_embd.weight", 2560) == "q8_0"
    assert _type_of("Q4_0", "token_embd.weight", 288) == "q8_0"  # ne0 % 256 != 0
    assert _type_of("Q4_0", "token_embd.weight", 100) == "f16"  # no block divides 100
    # _M variants raise attn_qkv and the use_more_bits layers of ffn_down
    assert _type_of("Q4_K_M", "blk.1.attn_qkv.weight", 2560, 1) == "q5_K"
    assert _type_of("Q5_K_M", "blk.1.attn_qkv.weight", 2560, 1) == "q6_K"
    assert _type_of("Q4_K_S", "blk.1.attn_qkv.weight", 2560, 1) == "q4_K"
    more = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    for i in range(32):
        got = sq._core.quantize_tensor_type("Q4_K_M", f"blk.{i}.ffn_down.weight", 2, 10240,
                                            "f32", i, 32)
        assert got == ("q6_K" if i in more else "q4_K"), i
    assert _type_of("Q2_K", "blk.1.attn_output.weight", 2560, 1) == "q3_K"
    # row length not divisible by the block: dt_proj has dt_rank = 160 columns
    assert _type_of("Q4_K_M", "blk.0.ssm_dt.weight", 160, 0) == "q5_0"
    assert _type_of("Q6_K", "blk.0.ssm_dt.weight", 160, 0) == "q8_0"
    assert _type_of("Q5_K_S", "blk.0.ssm_dt.weight", 160, 0) == "q5_1"
    assert _type_of("Q4_0", "blk.0.ssm_dt.weight", 16, 0) == "f16"
    # "other" matrices take the default type
    assert _type_of("Q4_K_M", "blk.20.gmu_in.weight", 2560, 20) == "q4_K"
    assert _type_of("Q4_0", "blk.19.attn_q.weight", 2560, 19) == "q4_0"


# relative RMS error bounds per tensor type on Gaussian data: about 1.5-2x the measured error (a
# broken kernel or a wrong type gives errors of order 1 or a different level)
_BOUND = {"F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.06, "Q5_1": 0.06,
          "Q5_K": 0.06, "Q4_0": 0.12, "Q4_1": 0.12, "Q4_K": 0.12, "Q3_K": 0.25, "Q2_K": 0.45}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantize_roundtrip(tmp_path, qtype):
    src = tmp_path / "in.gguf"
    tensors = _write_gguf(src)
    dst = tmp_path / "out.gguf"
    result = quantize(src, dst, qtype, n_threads=2, progress=False)
    reader, back = _read(dst)
    assert set(back) == set(tensors)
    # metadata copied, file type updated
    ft = {name: code for name, code, _ in sq._core.quantize_ftypes()}[qtype]
    assert reader.fields["general.file_type"].parts[-1][0] == ft
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "phi4flash"
    assert bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode() == "{{ messages }}"
    lt = reader.fields["phi4flash.layer_types"]
    assert [int(lt.parts[i][0]) for i in lt.data] == [0, 1, 0, 1, 0, 2, 3, 4]
    types = dict(result["tensor_types"])
    for name, arr in tensors.items():
        qt, deq = back[name]
        assert qt.name.lower() == types[name].lower()
        ref = np.asarray(arr, dtype=np.float32)
        assert deq.shape == ref.shape, name
        if types[name] == "f32":
            assert np.array_equal(deq, ref), name
            continue
        rel = float(np.sqrt(np.mean((deq - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
        assert rel <= _BOUND[qt.name], (name, qt.name, rel)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_quantized_file_is_smaller(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    sizes = {}
    for qtype in ("F16", "Q8_0", "Q4_0"):
        dst = tmp_path / f"{qtype}.gguf"
        sizes[qtype] = quantize(src, dst, qtype, n_threads=0, progress=False)["bytes_out"]  # 0: all
    assert sizes["Q4_0"] < sizes["Q8_0"] < sizes["F16"]


def test_bad_inputs(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    out = tmp_path / "out.gguf"
    with pytest.raises(QuantizeError, match="unknown quantization type 'Q9_9'"):
        quantize(src, out, "Q9_9", progress=False)
    # the input is refused by the model loader's checks (test_input_is_opened_by_the_model_loader)
    with pytest.raises(LoadError, match="No such file or directory"):
        quantize(tmp_path / "missing.gguf", out, "Q8_0", progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LoadError, match="is not a GGUF file"):
        quantize(junk, out, "Q8_0", progress=False)
    other = tmp_path / "llama.gguf"
    _write_gguf(other, arch="llama")
    with pytest.raises(LoadError, match="unsupported architecture 'llama'"):
        quantize(other, out, "Q8_0", progress=False)
    q = tmp_path / "q.gguf"
    _write_gguf(q, quantized=True)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(q, out, "Q4_0", progress=False)
    truncated = tmp_path / "trunc.gguf"
    data = src.read_bytes()
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(LoadError, match="truncated"):
        quantize(truncated, out, "Q8_0", progress=False)
    with pytest.raises(ValueError, match="n_threads must be an integer >= 0, got -1"):
        quantize(src, out, "Q8_0", n_threads=-1, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _hostile_inputs(tmp_path: Path) -> list[Path]:
    """Files the model loader refuses at opening: every regression GGUF of the fuzzer whose
    refusal is a file check (nan-epsilon.gguf is refused for its hyper-parameters, which the
    quantizer does not read), plus ones made here."""
    sys.path.insert(0, str(ROOT / "fuzz"))
    from gguf_fuzz import GGUF, KV, TInfo, serialize

    paths = [p for p in sorted(CORPUS.glob("*.gguf")) if p.name != "nan-epsilon.gguf"]
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    data = src.read_bytes()
    made = {
        "truncated.gguf": data[: len(data) - 1000],
        "header-cut.gguf": data[:100],
        "llama.gguf": data.replace(b"phi4flash", b"llama4fla", 1),  # same length: a valid file
        # ggml accepts a [2^40, 2^40] F32 tensor (its byte size wraps to 0); with a block count,
        # the quantizer's own checks used to let it through to the conversion
        "overflowing-dimensions.gguf": serialize(GGUF(3, [
            KV(b"general.architecture", 8, b"phi4flash"), KV(b"phi4flash.block_count", 4, N_LAYER)],
            [TInfo(b"blk.0.ffn_down.weight", [1 << 40, 1 << 40], 0, 0)], bytes(128)))[0],
    }
    for name, raw in made.items():
        (tmp_path / name).write_bytes(raw)
        paths.append(tmp_path / name)
    paths += [tmp_path / "missing.gguf", tmp_path]  # absent, a folder
    return paths


def test_input_is_opened_by_the_model_loader(tmp_path):
    """One opening path: every input the loader refuses, quantize refuses with the same
    LoadError and the same message, before writing anything."""
    out = tmp_path / "out.gguf"
    inputs = _hostile_inputs(tmp_path)
    assert len(inputs) >= 20
    for path in inputs:
        with pytest.raises(LoadError) as by_model:
            Model(str(path), device="cpu")
        with pytest.raises(LoadError) as by_quantize:
            quantize(path, out, "Q8_0", progress=False)
        assert str(by_quantize.value) == str(by_model.value), path.name
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_input_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opening a FIFO blocks until something writes to it: the loader must refuse it as not a
    regular file instead (in a subprocess, so a regression fails by the timeout, not a hang)."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code = ("import sys\nfrom sambay.engine import LoadError, Model\nfrom sambay.quantization import quantize\n"
            "for f in (lambda p: Model(p), lambda p: quantize(p, p + '.out', 'Q8_0', progress=False)):\n"
            "    try:\n        f(sys.argv[1])\n    except LoadError as e:\n        print(e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"'{fifo}' is not a regular file"] * 2


def test_cli(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    dst = tmp_path / "out.gguf"
    run = subprocess.run([sys.executable, "-m", "sambay", "quantize", str(src), str(dst), "q8_0",
                          "-q"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert dst.exists()
    run = subprocess.run([sys.executable, "-m", "sambay", "quantize", str(src), str(dst), "Q7"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("sambay quantize: error: unknown quantization type")
    assert "Traceback" not in run.stderr


# ------------------------------------------------------------------ llama-quantize's options


def _types(path):
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def _file_type(path):
    return int(gguf.GGUFReader(str(path)).fields["general.file_type"].parts[-1][0])


def test_numeric_ids_and_aliases(tmp_path):
    name = sq._core.quantize_ftype_name
    assert [name(s) for s in ("15", "q4_k", "Q5_K", "2", "7", "1", "0", "32", "q4_k_s")] == \
        ["Q4_K_M", "Q4_K_M", "Q5_K_M", "Q4_0", "Q8_0", "F16", "F32", "BF16", "Q4_K_S"]
    for bad in ("99", "", "Q4", "-1", "15x"):
        with pytest.raises(QuantizeError, match="unknown quantization type"):
            name(bad)
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    by_name = quantize(src, tmp_path / "a.gguf", "Q4_K_M", progress=False)
    by_id = quantize(src, tmp_path / "b.gguf", "15", progress=False)
    by_alias = quantize(src, tmp_path / "c.gguf", "Q4_K", progress=False)
    assert by_name["tensor_types"] == by_id["tensor_types"] == by_alias["tensor_types"]
    assert _file_type(tmp_path / "b.gguf") == _file_type(tmp_path / "c.gguf") == 15
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_pure_keeps_every_matrix_at_the_default_type(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    rules = dict(quantize(src, tmp_path / "rules.gguf", "Q4_K_M", progress=False)["tensor_types"])
    pure = dict(quantize(src, tmp_path / "pure.gguf", "Q4_K_M", progress=False, pure=True)["tensor_types"])
    assert (rules["token_embd.weight"], rules["blk.1.attn_qkv.weight"], rules["blk.0.ffn_down.weight"]) == \
        ("q6_K", "q5_K", "q6_K")
    assert (pure["token_embd.weight"], pure["blk.1.attn_qkv.weight"], pure["blk.0.ffn_down.weight"]) == \
        ("q4_K", "q4_K", "q4_K")
    assert pure["blk.0.ssm_dt.weight"] == "f16"  # 16 columns: no block fits, still a fallback
    assert pure["blk.0.attn_norm.weight"] == pure["blk.0.ssm_a"] == "f32"  # never quantized
    assert _types(tmp_path / "pure.gguf") == {k: v.lower() for k, v in pure.items()}
    assert _type_of("Q4_K_M", "token_embd.weight", 2560) == "q6_K"
    assert sq._core.quantize_tensor_type("Q4_K_M", "token_embd.weight", 2, 2560, "f32", -1, 8, pure=True) == "q4_K"


def test_output_and_embedding_types(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)  # tied: no output.weight, token_embd.weight is the output projection
    out = tmp_path / "o.gguf"
    got = dict(quantize(src, out, "Q4_0", progress=False, output_tensor_type="q8_0")["tensor_types"])
    assert got["token_embd.weight"] == "q8_0" and _types(out)["token_embd.weight"] == "q8_0"
    got = dict(quantize(src, out, "Q4_0", progress=False, token_embedding_type="F16")["tensor_types"])
    assert got["token_embd.weight"] == "f16" and _types(out)["token_embd.weight"] == "f16"
    assert got["blk.0.ssm_in.weight"] == "q4_0"  # the rest as the rules say
    with pytest.raises(QuantizeError, match="tied"):
        quantize(src, out, "Q4_0", progress=False, output_tensor_type="q8_0", token_embedding_type="f16")
    with pytest.raises(QuantizeError, match="unknown tensor type 'q9_0'"):
        quantize(src, out, "Q4_0", progress=False, output_tensor_type="q9_0")
    # a model with its own output.weight: the two options reach different tensors
    rng = np.random.default_rng(1)
    untied = tmp_path / "untied.gguf"
    _write_gguf(untied, tensors={"token_embd.weight": rng.standard_normal((64, 256)),
                                 "output.weight": rng.standard_normal((64, 256)),
                                 "blk.0.ssm_in.weight": rng.standard_normal((512, 256))})
    quantize(untied, out, "Q4_0", progress=False, output_tensor_type="q8_0", token_embedding_type="q5_1")
    assert _types(out) == {"token_embd.weight": "q5_1", "output.weight": "q8_0", "blk.0.ssm_in.weight": "q4_0"}
    quantize(untied, out, "Q4_0", progress=False, leave_output_tensor=True)
    assert _types(out) == {"token_embd.weight": "q6_k", "output.weight": "f32", "blk.0.ssm_in.weight": "q4_0"}
    # the overrides fall back like the rules when the blocks do not divide the rows
    assert sq._core.quantize_tensor_type("Q4_0", "output.weight", 2, 288, "f32", -1, 8, output_type="q6_K",
                                         tied_output=False) == "q8_0"


def test_leave_output_tensor_on_a_tied_model(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    got = dict(quantize(src, tmp_path / "o.gguf", "Q4_K_M", progress=False, leave_output_tensor=True)["tensor_types"])
    assert got["token_embd.weight"] == "f32" and _types(tmp_path / "o.gguf")["token_embd.weight"] == "f32"
    assert got["blk.6.gmu_in.weight"] == "q4_K"


def test_requantize_only_when_allowed(tmp_path):
    q = tmp_path / "q8.gguf"
    tensors = _write_gguf(q, quantized=True)
    out = tmp_path / "q4.gguf"
    with pytest.raises(QuantizeError, match="already quantized.*--allow-requantize"):
        quantize(q, out, "Q4_0", progress=False)
    assert not out.exists()
    got = dict(quantize(q, out, "Q4_0", progress=False, allow_requantize=True)["tensor_types"])
    reader, back = _read(out)
    assert _types(out) == {k: v.lower() for k, v in got.items()}
    assert got["blk.0.ssm_in.weight"] == "q4_0" and got["token_embd.weight"] == "q6_K"
    ref = np.asarray(tensors["blk.0.ssm_in.weight"], dtype=np.float32)
    rel = float(np.sqrt(np.mean((back["blk.0.ssm_in.weight"][1] - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    assert rel <= _BOUND["Q4_0"] + _BOUND["Q8_0"]
    # a tensor whose type does not change is copied as it is
    same = tmp_path / "same.gguf"
    quantize(q, same, "Q8_0", progress=False, allow_requantize=True)
    assert np.array_equal(gguf.GGUFReader(str(same)).get_tensor(3).data, gguf.GGUFReader(str(q)).get_tensor(3).data)


def test_dry_run_plans_without_writing(tmp_path):
    src = tmp_path / "in.gguf"
    _write_gguf(src)
    out = tmp_path / "never.gguf"
    plan = quantize(src, out, "Q4_K_M", progress=False, dry_run=True)
    assert not out.exists() and not list(p for p in tmp_path.iterdir() if p.name != "in.gguf")
    real = quantize(src, tmp_path / "real.gguf", "Q4_K_M", progress=False)
    assert plan["tensor_types"] == real["tensor_types"]
    assert (plan["bytes_in"], plan["bytes_out"]) == (real["bytes_in"], real["bytes_out"])
    assert sum(p[4] for p in plan["plan"]) == plan["bytes_out"]
    assert [(p[0], p[2]) for p in plan["plan"]] == plan["tensor_types"]
    assert dict((p[0], p[1]) for p in plan["plan"])["token_embd.weight"] == "f32"
    run = subprocess.run([sys.executable, "-m", "sambay", "quantize", str(src), str(out), "15", "--dry-run",
                          "--pure"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(plan["plan"]) + 1 and lines[-1].startswith("total: ")
    assert any(x.split()[:4] == ["token_embd.weight", "f32", "->", "q4_K"] for x in lines)
    assert not out.exists()


def test_cli_options_reach_the_quantizer(tmp_path):
    q = tmp_path / "q8.gguf"
    _write_gguf(q, quantized=True)
    out = tmp_path / "o.gguf"
    run = subprocess.run([sys.executable, "-m", "sambay", "quantize", str(q), str(out), "Q4_0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--allow-requantize" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    run = subprocess.run([sys.executable, "-m", "sambay", "quantize", str(q), str(out), "2", "-q", "--allow-requantize",
                          "--output-tensor-type", "q5_0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert _types(out)["token_embd.weight"] == "q5_0" and _file_type(out) == 2
