"""HF checkpoint -> GGUF (sambay.convert): every tensor and every metadata value, read back.

The expected values are recomputed here from docs/gguf-format.md, independently of the
converter's code: source tensors are read with the tests' own safetensors reader
(tests/numpy_reference.py), head de-interleave uses explicit index lists, λ is recomputed in
float64, F16 rounding is NumPy's IEEE cast and BF16 rounding is recomputed as round-to-nearest-
even in float64 (no torch needed).
"""

from __future__ import annotations

import json
import math
import shutil
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from numpy_reference import read_safetensors_folder
from sambay.convert import ConvertError, convert, tiny
from tokenizers import Tokenizer

# spec §2 / §12: 0 mamba, 1 swa, 2 full, 3 gmu, 4 cross
LAYER_TYPES = {
    "tiny-12": [0, 1, 0, 1, 0, 1, 0, 2, 3, 4, 3, 4],
    "tiny-8": [0, 1, 0, 1, 0, 2, 3, 4],
}
GGUF_TYPE = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
}
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}
U32, I32, F32, STR, BOOL, ARR = (
    gguf.GGUFValueType.UINT32,
    gguf.GGUFValueType.INT32,
    gguf.GGUFValueType.FLOAT32,
    gguf.GGUFValueType.STRING,
    gguf.GGUFValueType.BOOL,
    gguf.GGUFValueType.ARRAY,
)

_CACHE: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(config, dtype, sharded, style, **kw) -> a cached checkpoint folder."""

    def make(config="tiny-12", dtype="float32", sharded=False, style="int", **kw):
        key = (config, dtype, sharded, style, json.dumps(kw, sort_keys=True))
        if key not in _CACHE:
            folder = tmp_path_factory.mktemp(f"{config}-{dtype}")
            _CACHE[key] = tiny.write_checkpoint(
                folder, config, seed=7, dtype=dtype, sharded=sharded, config_style=style, **kw
            )
        return _CACHE[key]

    return make


# ---------------------------------------------------------------------------------------------
# independent reference


def load_source(folder: Path) -> dict[str, np.ndarray]:
    """Every checkpoint tensor as float32 (exact: the checkpoints hold F32 or BF16)."""
    return {k: v.astype(np.float32) for k, v in read_safetensors_folder(folder).items()}


def hparams_of(cfg: dict) -> dict:
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    dt_rank = cfg.get("mamba_dt_rank", "auto")
    return dict(
        d=d,
        H=h,
        Hkv=cfg["num_key_value_heads"],
        hd=d // h,
        Di=cfg.get("mamba_expand", 2) * d,
        S=cfg.get("mamba_d_state", 16),
        K=cfg.get("mamba_d_conv", 4),
        R=math.ceil(d / 16) if dt_rank == "auto" else dt_rank,
    )


def stripe_rows(n_heads: int, hd: int, base: int = 0) -> list[int]:
    """Row indices of the head blocks in the order 0, 2, 4, ..., 1, 3, 5, ..."""
    order = [h for h in range(n_heads) if h % 2 == 0] + [h for h in range(n_heads) if h % 2 == 1]
    return [base + h * hd + j for h in order for j in range(hd)]


def expected_tensors(src: dict[str, np.ndarray], cfg: dict, layer_types: list[int]):
    """GGUF name -> (expected float32 values in numpy order, always_f32)."""
    p = hparams_of(cfg)
    H, Hkv, hd = p["H"], p["Hkv"], p["hd"]
    exp = {
        "token_embd.weight": (src["model.embed_tokens.weight"], False),
        "output_norm.weight": (src["model.final_layernorm.weight"], True),
        "output_norm.bias": (src["model.final_layernorm.bias"], True),
    }
    for i, kind in enumerate(layer_types):
        s, b = f"model.layers.{i}.", f"blk.{i}."
        exp[b + "attn_norm.weight"] = (src[s + "input_layernorm.weight"], True)
        exp[b + "attn_norm.bias"] = (src[s + "input_layernorm.bias"], True)
        exp[b + "ffn_norm.weight"] = (src[s + "post_attention_layernorm.weight"], True)
        exp[b + "ffn_norm.bias"] = (src[s + "post_attention_layernorm.bias"], True)
        exp[b + "ffn_up.weight"] = (src[s + "mlp.fc1.weight"], False)
        exp[b + "ffn_down.weight"] = (src[s + "mlp.fc2.weight"], False)
        a = s + "attn."
        if kind == 0:
            conv = src[a + "conv1d.weight"]
            exp[b + "ssm_in.weight"] = (src[a + "in_proj.weight"], False)
            exp[b + "ssm_conv1d.weight"] = (conv.reshape(conv.shape[0], conv.shape[2]), True)
            exp[b + "ssm_conv1d.bias"] = (src[a + "conv1d.bias"], True)
            exp[b + "ssm_x.weight"] = (src[a + "x_proj.weight"], False)
            exp[b + "ssm_dt.weight"] = (src[a + "dt_proj.weight"], False)
            exp[b + "ssm_dt.bias"] = (src[a + "dt_proj.bias"], True)
            exp[b + "ssm_a"] = ("A", src[a + "A_log"])  # checked with a tolerance
            exp[b + "ssm_d"] = (src[a + "D"], True)
            exp[b + "ssm_out.weight"] = (src[a + "out_proj.weight"], False)
        elif kind == 3:
            exp[b + "gmu_in.weight"] = (src[a + "in_proj.weight"], False)
            exp[b + "gmu_out.weight"] = (src[a + "out_proj.weight"], False)
        else:
            if kind == 4:
                rows = stripe_rows(H, hd)
                name = "attn_q"
            else:
                rows = (
                    stripe_rows(H, hd)
                    + stripe_rows(Hkv, hd, base=H * hd)
                    + list(range((H + Hkv) * hd, (H + 2 * Hkv) * hd))
                )
                name = "attn_qkv"
            w, bias = src[a + "Wqkv.weight"], src[a + "Wqkv.bias"]
            assert len(rows) == w.shape[0] == len(set(rows))
            exp[f"{b}{name}.weight"] = (w[rows], False)
            exp[f"{b}{name}.bias"] = (bias[rows], True)
            exp[b + "attn_output.weight"] = (src[a + "out_proj.weight"], False)
            exp[b + "attn_output.bias"] = (src[a + "out_proj.bias"], True)
            exp[b + "attn_sub_norm.weight"] = (src[a + "inner_cross_attn.subln.weight"], True)
    return exp


def stored_as(x: np.ndarray, outtype: str) -> np.ndarray:
    """What x (float32) must look like in the GGUF: F16 by IEEE rounding, BF16 bit patterns
    of the nearer of its two bf16 neighbours (ties to even), decided in float64."""
    if outtype == "f32":
        return x
    if outtype == "f16":
        return np.ascontiguousarray(x).astype(np.float16)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lo = bits & np.uint32(0xFFFF0000)  # toward zero
    hi = lo + np.uint32(0x10000)  # one bf16 step away from zero
    d_lo = np.abs(x.astype(np.float64) - lo.view(np.float32).astype(np.float64))
    d_hi = np.abs(hi.view(np.float32).astype(np.float64) - x.astype(np.float64))
    up = (d_hi < d_lo) | ((d_hi == d_lo) & ((lo >> 16) & 1 == 1))
    return (np.where(up, hi, lo) >> 16).astype(np.uint16)


def read_gguf(path: Path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = data.view(np.uint16)
        tensors[t.name] = (t.tensor_type, [int(n) for n in t.shape], data)
    return r, fields, tensors


# ---------------------------------------------------------------------------------------------
# the round trip

CASES = [
    # config, dtype, sharded, config style, outtype, expected bulk type
    ("tiny-12", "float32", False, "int", "auto", "f32"),
    ("tiny-12", "bfloat16", True, "list", "auto", "bf16"),
    ("tiny-8", "float32", True, "layer_types", "f16", "f16"),
    ("tiny-8", "bfloat16", False, "int", "f32", "f32"),
    ("tiny-12", "float32", False, "layer_types", "bf16", "bf16"),
    ("tiny-8", "bfloat16", False, "list", "f16", "f16"),
]


@pytest.mark.parametrize(
    "config,dtype,sharded,style,outtype,bulk",
    CASES,
    ids=[f"{c}-{d}-{'sharded' if s else 'single'}-{st}-{o}" for c, d, s, st, o, _ in CASES],
)
def test_round_trip(ckpt, tmp_path, config, dtype, sharded, style, outtype, bulk):
    folder = ckpt(config, dtype, sharded, style)
    out = convert(folder, tmp_path / "m.gguf", outtype=outtype, progress=False)
    assert out == tmp_path / "m.gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    cfg = json.loads((folder / "config.json").read_text())
    src = load_source(folder)
    _, fields, tensors = read_gguf(out)

    # --- tensors: exactly the expected set, each equal to its source after the transform
    expected = expected_tensors(src, cfg, LAYER_TYPES[config])
    assert set(tensors) == set(expected)
    for name, (ttype, ne, data) in tensors.items():
        want, always_f32 = expected[name]
        if isinstance(want, str):  # A = -exp(A_log), F32
            a_log = always_f32
            assert ttype == gguf.GGMLQuantizationType.F32 and ne == list(a_log.shape[::-1])
            np.testing.assert_allclose(data, -np.exp(a_log.astype(np.float64)), rtol=2e-7, atol=0)
            assert (data < 0).all()
            continue
        store = "f32" if always_f32 else bulk
        assert ttype == GGUF_TYPE[store], name
        assert ne == list(want.shape[::-1]), name  # ggml ne order is the numpy shape reversed
        assert data.shape == want.shape, name
        np.testing.assert_array_equal(data, stored_as(want, store), err_msg=name)

    # --- metadata: every key and value
    p = hparams_of(cfg)
    n = cfg["num_hidden_layers"]
    lam, lam_init = [0.0] * n, [0.0] * n
    for i, kind in enumerate(LAYER_TYPES[config]):
        if kind in (1, 2, 4):
            v = {
                k: src[f"model.layers.{i}.attn.inner_cross_attn.lambda_{k}"].astype(np.float64)
                for k in ("q1", "k1", "q2", "k2")
            }
            lam_init[i] = 0.8 - 0.6 * math.exp(-0.3 * i)
            lam[i] = math.exp(v["q1"] @ v["k1"]) - math.exp(v["q2"] @ v["k2"]) + lam_init[i]
    assert any(abs(lam[i] - lam_init[i]) > 1e-3 for i in range(n))  # λ really folds the vectors

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = tok.token_to_id("<|endoftext|>")
    want_meta = {
        "general.architecture": ("phi4flash", STR),
        "general.sampling.temp": (np.float32(0.6), F32),  # the model card's (no generation_config value)
        "general.sampling.top_p": (np.float32(0.95), F32),
        "general.file_type": (FILE_TYPE[bulk], U32),
        "general.quantization_version": (2, U32),
        "phi4flash.context_length": (
            min(tok_cfg["model_max_length"], cfg["max_position_embeddings"]),
            U32,
        ),
        "phi4flash.embedding_length": (p["d"], U32),
        "phi4flash.block_count": (n, U32),
        "phi4flash.feed_forward_length": (cfg["intermediate_size"], U32),
        "phi4flash.vocab_size": (cfg["vocab_size"], U32),
        "phi4flash.attention.head_count": (p["H"], U32),
        "phi4flash.attention.head_count_kv": (p["Hkv"], U32),
        "phi4flash.attention.key_length": (p["hd"], U32),
        "phi4flash.attention.value_length": (p["hd"], U32),
        "phi4flash.attention.layer_norm_epsilon": (np.float32(cfg["layer_norm_eps"]), F32),
        "phi4flash.attention.sliding_window": (tiny.CONFIGS[config]["sliding_window"], U32),
        "phi4flash.ssm.conv_kernel": (p["K"], U32),
        "phi4flash.ssm.inner_size": (p["Di"], U32),
        "phi4flash.ssm.state_size": (p["S"], U32),
        "phi4flash.ssm.time_step_rank": (p["R"], U32),
        "phi4flash.layer_types": (LAYER_TYPES[config], I32),
        "phi4flash.mb_per_layer": (2, U32),
        "phi4flash.memory_layer": (n // 2, U32),
        "phi4flash.kv_shared_layer": (n // 2 + 1, U32),
        "phi4flash.attention.diff_lambda": (list(np.float32(lam)), F32),
        "phi4flash.attention.diff_lambda_init": (list(np.float32(lam_init)), F32),
        "phi4flash.attention.sub_norm_epsilon": (np.float32(1e-5), F32),
        "phi4flash.attention.heads_deinterleaved": (True, BOOL),
        "tokenizer.ggml.model": ("gpt2", STR),
        "tokenizer.ggml.pre": ("default", STR),
        "tokenizer.ggml.bos_token_id": (eos, U32),
        "tokenizer.ggml.eos_token_id": (eos, U32),
        "tokenizer.ggml.padding_token_id": (eos, U32),
        "tokenizer.ggml.unknown_token_id": (eos, U32),
        "tokenizer.ggml.eot_token_id": (tok.token_to_id("<|end|>"), U32),
        "tokenizer.ggml.eog_token_ids": (gen["eos_token_id"], I32),
        "tokenizer.ggml.add_bos_token": (False, BOOL),
        "tokenizer.ggml.add_eos_token": (False, BOOL),
        "tokenizer.chat_template": (tiny.CHAT_TEMPLATE, STR),
        "tokenizer.huggingface.json": (
            (folder / "tokenizer.json").read_text(encoding="utf-8"),
            STR,
        ),
    }
    list_keys = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    # names gguf-py's Metadata derives from the (temporary) folder name; checked in
    # test_general_metadata_from_card_generation_config_and_repo
    named = {k for k in fields if k in ("general.name", "general.basename", "general.size_label",
                                        "general.finetune", "general.version")}
    assert "general.name" in named
    assert set(fields) - named == set(want_meta) | list_keys
    for key, (value, vtype) in want_meta.items():
        f = fields[key]
        if isinstance(value, list):
            assert f.types == [ARR, vtype], key
        else:
            assert f.types == [vtype], key
        assert f.contents() == value, key
    assert gen["eos_token_id"] == [tok.token_to_id("<|end|>"), eos]

    # --- vocabulary: tokens, types and merges vs the source tokenizer.json
    j = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t for t in j["added_tokens"]}
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    tokens, types = (
        fields["tokenizer.ggml.tokens"].contents(),
        fields["tokenizer.ggml.token_type"].contents(),
    )
    assert len(tokens) == len(types) == cfg["vocab_size"] > n_tok
    for i in range(cfg["vocab_size"]):
        if i >= n_tok:
            assert (tokens[i], types[i]) == (f"[PAD{i}]", 5)
        elif i in added:
            assert (tokens[i], types[i]) == (added[i]["content"], 3 if added[i]["special"] else 4)
        else:
            assert (tokens[i], types[i]) == (tok.id_to_token(i), 1)
    assert types.count(3) == 7 and types.count(4) == 5  # the real special / tool tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"].contents() == merges

    # the embedded tokenizer.json rebuilds a tokenizer that encodes like the source
    rebuilt = Tokenizer.from_str(fields["tokenizer.huggingface.json"].contents())
    for text in [
        "The quick brown fox",
        "<|user|>2+2?<|end|><|assistant|>",
        "déjà vu 東京 🙂\n\n x",
        "<|tool|>get_weather<|/tool|>",
    ]:
        assert rebuilt.encode(text).ids == tok.encode(text).ids
        # and the GGUF token strings are the tokens the source produces
        assert [tokens[i] for i in tok.encode(text).ids] == tok.encode(text).tokens


def test_output_is_deterministic_and_replaces_existing(ckpt, tmp_path):
    folder = ckpt("tiny-8", "bfloat16")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    convert(folder, out, progress=False)
    first = out.read_bytes()
    convert(folder, out, progress=False)
    assert out.read_bytes() == first and first[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_lm_head_equal_to_embedding_is_dropped(ckpt, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt("tiny-8", "float32"), folder)
    add_tensor(folder, "lm_head.weight", load_source(folder)["model.embed_tokens.weight"])
    _, _, tensors = read_gguf(convert(folder, tmp_path / "m.gguf", progress=False))
    assert "lm_head.weight" not in tensors and "output.weight" not in tensors
    cfg = json.loads((folder / "config.json").read_text())
    src = load_source(folder)
    assert set(tensors) == set(expected_tensors(src, cfg, LAYER_TYPES["tiny-8"]))
    np.testing.assert_array_equal(tensors["token_embd.weight"][2], src["model.embed_tokens.weight"])
    with pytest.raises(ConvertError, match="lm_head.weight differs"):
        add_tensor(folder, "lm_head.weight", load_source(folder)["model.embed_tokens.weight"] * 1.5)
        convert(folder, tmp_path / "m2.gguf", progress=False)
    assert not (tmp_path / "m2.gguf").exists()


def add_tensor(folder: Path, name: str, value: np.ndarray) -> None:
    """Rewrite the single-file checkpoint with one tensor added or replaced."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


MODEL_CARD = """---
license: mit
language:
- en
pipeline_tag: text-generation
tags:
- math
base_model: microsoft/Phi-4-mini-instruct
---
# Phi-4-mini-flash-reasoning
"""


def test_general_metadata_from_card_generation_config_and_repo(ckpt, tmp_path):
    folder = tmp_path / "Phi-4-mini-flash-reasoning"
    shutil.copytree(ckpt("tiny-8", "bfloat16"), folder)
    (folder / "README.md").write_text(MODEL_CARD)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.7, "top_k": 20}))
    _, fields, _ = read_gguf(convert(folder, tmp_path / "m.gguf", progress=False,
                                     repo_id="microsoft/Phi-4-mini-flash-reasoning"))
    got = {k: f.contents() for k, f in fields.items() if k.startswith("general.")}
    # generation_config.json wins over the model card's recommendation; top_p stays the card's
    assert got["general.sampling.temp"] == pytest.approx(0.7)
    assert got["general.sampling.top_k"] == 20
    assert got["general.sampling.top_p"] == pytest.approx(0.95)
    assert got["general.name"] == "Phi 4 Mini Flash Reasoning"
    assert got["general.organization"] == "Microsoft"
    assert got["general.basename"] == "Phi-4"
    assert got["general.source.repo_url"] == "https://huggingface.co/microsoft/Phi-4-mini-flash-reasoning"
    assert got["general.license"] == "mit"
    assert got["general.languages"] == ["en"]
    assert "math" in got["general.tags"]
    assert got["general.base_model.count"] == 1
    assert got["general.base_model.0.name"] == "Phi 4 Mini Instruct"
    assert got["general.base_model.0.repo_url"] == "https://huggingface.co/microsoft/Phi-4-mini-instruct"


def test_size_label_counts_the_written_parameters(ckpt, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(ckpt("tiny-8", "bfloat16"), folder)
    _, fields, tensors = read_gguf(convert(folder, tmp_path / "m.gguf", progress=False))
    n = sum(int(np.prod(shape)) for _, shape, _ in tensors.values())
    assert fields["general.size_label"].contents() == gguf.size_label(n, 0, 0, 0)
    assert fields["general.name"].contents() == "Plain"


@pytest.mark.parametrize("max_len,expected", [(1024, 1024), (10**30, 2048), (None, 2048)])
def test_context_length_from_model_max_length(ckpt, tmp_path, max_len, expected):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt("tiny-8", "bfloat16"), folder)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    if max_len is None:
        del tc["model_max_length"]
    else:
        tc["model_max_length"] = max_len
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    _, fields, _ = read_gguf(convert(folder, tmp_path / "m.gguf", progress=False))
    assert fields["phi4flash.context_length"].contents() == expected


def test_mamba_defaults_and_explicit_dt_rank(ckpt, tmp_path):
    # tiny-12 has no mamba_* keys (like the real config): d_state 16, d_conv 4, expand 2, dt_rank auto
    _, fields, _ = read_gguf(
        convert(ckpt("tiny-12", "bfloat16"), tmp_path / "a.gguf", progress=False)
    )
    assert [
        fields[f"phi4flash.ssm.{k}"].contents()
        for k in ("state_size", "conv_kernel", "inner_size", "time_step_rank")
    ] == [16, 4, 512, 16]
    folder = ckpt("tiny-8", "bfloat16", overrides={"mamba_dt_rank": 5, "mamba_expand": 3})
    _, fields, tensors = read_gguf(convert(folder, tmp_path / "b.gguf", progress=False))
    assert fields["phi4flash.ssm.time_step_rank"].contents() == 5
    assert fields["phi4flash.ssm.inner_size"].contents() == 192
    assert tensors["blk.0.ssm_x.weight"][1] == [192, 5 + 2 * 8]


# ---------------------------------------------------------------------------------------------
# slow tokenizer files and o200k detection


def test_slow_tokenizer_files_added_ids_win(ckpt, tmp_path):
    """vocab.json + merges.txt + added_tokens.json, with vocab.json's special ids shifted by one
    from <|user|> on, as in the real checkpoint (spec §0.1 trap): the added-token ids win."""
    folder = tmp_path / "ck"
    shutil.copytree(ckpt("tiny-12", "bfloat16"), folder)
    j = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    (folder / "tokenizer.json").unlink()
    added = {t["content"]: t["id"] for t in j["added_tokens"]}
    vocab = {t: i for t, i in j["model"]["vocab"].items() if t not in added}
    user = added["<|user|>"]
    for content, tid in added.items():  # the trap: shifted ids in vocab.json
        vocab[content] = tid + 1 if tid >= user else tid
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")

    _, fields, _ = read_gguf(convert(folder, tmp_path / "m.gguf", progress=False))
    assert "tokenizer.huggingface.json" not in fields
    tokens, types = (
        fields["tokenizer.ggml.tokens"].contents(),
        fields["tokenizer.ggml.token_type"].contents(),
    )
    special = {c: s for c, s, _ in tiny.SPECIAL_TOKENS}
    for content, tid in added.items():
        assert tokens[tid] == content and types[tid] == (3 if special[content] else 4)
    hole = max(added.values()) + 1  # vocab.json's shifted <|tag|> id is nobody's now
    assert (tokens[hole], types[hole]) == (f"[PAD{hole}]", 5)
    for t, i in j["model"]["vocab"].items():
        if t not in added:
            assert tokens[i] == t and types[i] == 1
    assert fields["tokenizer.ggml.merges"].contents() == merges
    assert fields["tokenizer.ggml.eos_token_id"].contents() == added["<|endoftext|>"]
    assert fields["tokenizer.ggml.eot_token_id"].contents() == added["<|end|>"]


def _o200k_like_folder(folder: Path, probes_ok: bool) -> None:
    folder.mkdir()
    vocab = {f"t{i}": i for i in range(199998)}
    probes = {"!": 0, "ĊĊ": 279, "ing": 289, "Ġthe": 290, "ĠHello": 32949}
    for t, i in probes.items():
        vocab.pop(f"t{i}")
        vocab[t] = i if probes_ok else i + 1000
        if not probes_ok:
            vocab.pop(f"t{i + 1000}")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\n", encoding="utf-8")
    (folder / "added_tokens.json").write_text(
        json.dumps({"<|endoftext|>": 199999, "<|end|>": 200020})
    )


@pytest.mark.parametrize("probes_ok,pre", [(True, "gpt-4o"), (False, "default")])
def test_o200k_vocabulary_gets_gpt4o_pre_tokenizer(tmp_path, probes_ok, pre):
    from sambay.convert.vocab import load_vocab

    folder = tmp_path / "tok"
    _o200k_like_folder(folder, probes_ok)
    tok_cfg = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    v = load_vocab(folder, n_vocab=200064, tok_cfg=tok_cfg, config={}, allow_missing=False)
    assert v is not None and v.pre == pre
    assert (
        len(v.tokens) == 200064
        and v.tokens[199998] == "[PAD199998]"
        and v.tokens[200063] == "[PAD200063]"
    )
    assert (
        v.tokens[199999] == "<|endoftext|>" and v.token_types[199999] == 3
    )  # named as eos: special
    assert v.token_types[200020] == 4  # no special flag anywhere: user-defined
    assert v.eog_ids == [199999] and v.eot_id == 200020 and v.special_ids["unknown"] is None


# ---------------------------------------------------------------------------------------------
# memory


def test_peak_memory_is_bounded_by_a_chunk(tmp_path, monkeypatch):
    """A checkpoint with one 32 MiB tensor converts with a traced peak far below its size:
    tensors stream, and big matrices go through in row chunks."""
    from sambay.convert import pipeline

    folder = tiny.write_checkpoint(
        tmp_path / "ck",
        "tiny-8",
        dtype="float32",
        tokenizer=False,
        overrides={"vocab_size": 131072},
    )  # embedding 131072 x 64 f32
    big = 131072 * 64 * 4
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        # numpy reports its buffers to tracemalloc: check that it does, so the test means something
        base, _ = tracemalloc.get_traced_memory()
        probe = np.ones(1 << 20, dtype=np.uint8)
        assert tracemalloc.get_traced_memory()[0] - base >= 1 << 20
        del probe
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        convert(
            folder, tmp_path / "m.gguf", outtype="f16", allow_missing_tokenizer=True, progress=False
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert total > big
    assert peak - base < big / 4, f"peak {peak - base} bytes for a {big}-byte tensor"
