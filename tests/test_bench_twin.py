"""bench/phi3_twin.py writes a phi3 GGUF with llama.cpp's tensor names, shapes and keys
(llama.cpp itself is not needed; the peers benchmark is what loads it)."""

import sys
from pathlib import Path

import numpy as np
import pytest

import gguf  # a runtime dependency of sambay

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`
from bench import phi3_twin  # noqa: E402

CFG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256}


def _field(r, key):
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_twin_layout(tmp_path, qtype):
    p = phi3_twin.write_twin(tmp_path / "t.gguf", CFG, qtype=qtype)
    r = gguf.GGUFReader(str(p))
    assert _field(r, "general.architecture") == "phi3"
    assert _field(r, "phi3.block_count") == 2
    assert _field(r, "phi3.attention.head_count_kv") == 2
    assert _field(r, "phi3.rope.dimension_count") == 16
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 320
    shapes = {t.name: (t.shape.tolist(), t.tensor_type.name) for t in r.tensors}
    assert shapes["token_embd.weight"] == ([64, 320], qtype)
    assert shapes["blk.1.attn_qkv.weight"] == ([64, 64 + 2 * 2 * 16], qtype)
    assert shapes["blk.1.ffn_up.weight"] == ([64, 2 * 96], qtype)
    assert shapes["blk.1.ffn_down.weight"] == ([96, 64], qtype)
    assert shapes["output_norm.weight"] == ([64], "F32")
    assert "output.weight" not in shapes  # tied, like SambaY
    assert len(shapes) == 3 + 6 * 2 - 1
    n = sum(int(t.n_elements) for t in r.tensors)
    assert n == phi3_twin.n_params(CFG)
    assert np.isfinite(r.get_tensor(1).data).all()
