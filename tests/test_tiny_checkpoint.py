"""The random test-checkpoint generator (sambay.convert.tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from needs_torch import import_torch

torch = import_torch()

from safetensors import safe_open  # noqa: E402
from sambay.convert import tiny  # noqa: E402
from sambay.convert.schedule import LayerKind, ScheduleError, layer_kinds  # noqa: E402


def _load(folder):
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as g:
            for k in g.keys():
                out[k] = g.get_tensor(k)
    return out


def test_real_schedule_matches_spec_table():
    # spec §2.2
    expected = "M S M S M S M S M S M S M S M S M G U X U X U X U X U X U X U X".split()
    code = {LayerKind.MAMBA: "M", LayerKind.ATTN_SWA: "S", LayerKind.ATTN_FULL: "G",
            LayerKind.GMU: "U", LayerKind.ATTN_CROSS: "X"}
    assert [code[k] for k in layer_kinds(32)] == expected


@pytest.mark.parametrize("n", [0, 6, 10, -4])
def test_schedule_rejects_bad_layer_counts(n):
    with pytest.raises(ScheduleError):
        layer_kinds(n)


def test_schedule_checks_per_layer_lists():
    kinds = layer_kinds(8)
    good = [8 if k == LayerKind.ATTN_SWA else None for k in kinds]
    layer_kinds(8, sliding_window=good)
    bad = list(good)
    bad[5] = 8  # the full-attention layer must not have a window
    with pytest.raises(ScheduleError, match=r"sliding_window\[5\]"):
        layer_kinds(8, sliding_window=bad)
    with pytest.raises(ScheduleError, match="layer_types"):
        layer_kinds(8, layer_types=["sliding_attention"] * 8)


def test_real_model_has_434_tensors_and_no_lm_head():
    cfg = tiny.CONFIGS["phi4-mini-flash"]
    names = [s[0] for s in tiny.tensor_specs(cfg)]
    # spec §3: 1 + 2 + 32*6 + 9*9 + 7*2 + 9*9 + 7*9
    assert len(names) == len(set(names)) == 434
    assert "lm_head.weight" not in names
    n_params = sum(int(np.prod(s[1])) for s in tiny.tensor_specs(cfg))
    assert abs(n_params / 1e9 - 3.853) < 0.01  # spec §1.2


def test_deterministic_and_seed_sensitive(tmp_path):
    a = _load(tiny.write_checkpoint(tmp_path / "a", "tiny-8", seed=3))
    b = _load(tiny.write_checkpoint(tmp_path / "b", "tiny-8", seed=3, sharded=True,
                                    config_style="list"))
    c = _load(tiny.write_checkpoint(tmp_path / "c", "tiny-8", seed=4))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_bfloat16_variant_matches_torch_rounding(tmp_path):
    f32 = _load(tiny.write_checkpoint(tmp_path / "f", "tiny-8", seed=1))
    bf = _load(tiny.write_checkpoint(tmp_path / "b", "tiny-8", seed=1, dtype="bfloat16"))
    for k, v in bf.items():
        if k.endswith("A_log") or "lambda_" in k:
            assert v.dtype == torch.float32, k  # stored F32 in the real checkpoint too
            assert torch.equal(v, f32[k])
        else:
            assert v.dtype == torch.bfloat16, k
            assert torch.equal(v, f32[k].to(torch.bfloat16)), k


def test_every_parameter_is_randomised(tmp_path):
    sd = _load(tiny.write_checkpoint(tmp_path / "c", "tiny-12", seed=0))
    for k, v in sd.items():
        assert v.float().std() > 1e-3, f"{k} is constant"
    # λ ≠ λ_init: the exp(q1.k1) - exp(q2.k2) term is far from 0 somewhere
    p = "model.layers.1.attn.inner_cross_attn."
    lam = torch.exp((sd[p + "lambda_q1"] * sd[p + "lambda_k1"]).sum()) - torch.exp(
        (sd[p + "lambda_q2"] * sd[p + "lambda_k2"]).sum()
    )
    assert abs(float(lam)) > 0.05
    a_log = sd["model.layers.0.attn.A_log"]
    assert torch.allclose(a_log.mean(0), torch.log(torch.arange(1, 17.0)), atol=0.1)


def test_folder_layout_and_tokenizer(tmp_path):
    folder = tiny.write_checkpoint(tmp_path / "t", "tiny-12", sharded=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["Phi4FlashForCausalLM"]
    assert cfg["model_type"] == "phi4flash"
    assert not any(k.startswith("mamba_") for k in cfg)  # like the real config.json
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert len(index["weight_map"]) == tiny.expected_tensor_count(cfg)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() <= cfg["vocab_size"]
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    gen = json.loads((folder / "generation_config.json").read_text())
    end, eot = tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")
    assert gen["eos_token_id"] == [end, eot]
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == eot
    enc = tok.encode("<|user|>hi<|end|><|assistant|>")
    assert enc.tokens[0] == "<|user|>" and enc.tokens[-1] == "<|assistant|>"
    assert tc["added_tokens_decoder"][str(tok.token_to_id("<|tool|>"))]["special"] is False

    import jinja2

    text = jinja2.Environment().from_string(tc["chat_template"]).render(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        add_generation_prompt=True, eos_token="<|endoftext|>")
    assert text == "<|system|>S<|end|><|user|>U<|end|><|assistant|>"
