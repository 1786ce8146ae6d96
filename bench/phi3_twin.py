"""A random-weight ``phi3``-architecture GGUF that llama.cpp loads: the transformer twin.

Phi-4-mini-flash-reasoning's transformer sibling (Phi-4-mini) is a ``phi3`` model in llama.cpp.
This writes one with random weights at any shape, so the peers benchmark (``bench/peers.py``)
can run llama.cpp on a plain transformer of the same width, depth, heads and vocab as a
scaled-down SambaY. Tensor names and metadata keys follow llama.cpp's ``LLM_ARCH_PHI3``:
fused ``attn_qkv`` and fused gate+up ``ffn_up`` (2 * n_ff rows), RMSNorm, NeoX RoPE over the
full head dimension, the output tied to ``token_embd`` (as in SambaY). The tokenizer is a minimal byte-level ``gpt2`` vocab
(256 byte symbols, one merge, filler tokens) that exists only so the loader accepts the file;
the benchmark feeds token ids.

    python -m bench.phi3_twin OUT.gguf [--hidden 1024 --layers 16 ...] [--type F16|Q8_0|Q4_0]

Needs only ``numpy`` and ``gguf`` (gguf-py), not llama.cpp.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MEDIUM_SHAPE

TWIN_MEDIUM = MEDIUM_SHAPE

# Phi-4-mini (microsoft/Phi-4-mini-instruct config.json): the transformer Phi-4-mini-flash is
# measured against. RoPE covers 3/4 of each 128-wide head (partial_rotary_factor 0.75).
PHI4_MINI_SHAPE = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "vocab_size": 200064,
    "max_position_embeddings": 131072,
    "partial_rotary_factor": 0.75,
}


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], int, int]:
    toks = _byte_symbols()  # ids 0..255
    merges = ["Ġ t"]
    toks.append("Ġt")
    n_special = 2
    while len(toks) < n_vocab - n_special:
        toks.append(f"tok{len(toks)}")
    toks += ["<|endoftext|>", "<|end|>"]
    types = [1] * (n_vocab - n_special) + [3] * n_special  # NORMAL, CONTROL
    return toks, types, merges, n_vocab - 2, n_vocab - 1


def n_params(cfg: dict[str, Any]) -> int:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    qkv = d * (d + 2 * cfg["num_key_value_heads"] * hd)
    per_layer = qkv + d * d + d * 2 * f + f * d + 2 * d
    return cfg["num_hidden_layers"] * per_layer + v * d + d


def write_twin(out: str | Path, cfg: dict[str, Any] | None = None, *, qtype: str = "F16",
               seed: int = 0) -> Path:
    """Write the twin GGUF; ``qtype`` is the type of the 2-D matrices (norms stay F32)."""
    import gguf
    from gguf.quants import quantize

    cfg = dict(TWIN_MEDIUM if cfg is None else cfg)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // n_head
    n_layer = cfg["num_hidden_layers"]
    out = Path(out)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    file_type = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]

    w = gguf.GGUFWriter(str(out), "phi3")
    # (a general.name containing "phi3" makes llama.cpp look up <s>, </s>, <unk> in the vocab)
    w.add_name("sambay-bench-twin")
    w.add_file_type(int(file_type))
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(int(hd * cfg.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(10000.0)
    toks, types, merges, bos, eos = _vocab(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    rng = np.random.default_rng(seed)
    # (name, rows, cols): every tensor is declared first, then written one at a time, so a
    # multi-GB twin never sits in memory whole
    plan: list[tuple[str, int, int]] = [("token_embd.weight", v, d)]
    for i in range(n_layer):
        plan += [(f"blk.{i}.attn_norm.weight", 1, d), (f"blk.{i}.attn_qkv.weight", d + 2 * n_kv * hd, d),
                 (f"blk.{i}.attn_output.weight", d, d), (f"blk.{i}.ffn_norm.weight", 1, d),
                 (f"blk.{i}.ffn_up.weight", 2 * f, d), (f"blk.{i}.ffn_down.weight", d, f)]
    plan.append(("output_norm.weight", 1, d))
    # no output.weight: llama.cpp's phi3 then ties the output to token_embd, as SambaY does

    def is_norm(name: str) -> bool:
        return name.endswith("norm.weight")

    def tensor(name: str, rows: int, cols: int) -> np.ndarray:
        if is_norm(name):
            return np.ones(cols, dtype=np.float32)
        a = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        return a.astype(np.float16) if qt == gguf.GGMLQuantizationType.F16 else quantize(a, qt)

    for name, rows, cols in plan:
        if is_norm(name):
            w.add_tensor_info(name, [cols], np.dtype(np.float32), cols * 4)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor_info(name, [rows, cols], np.dtype(np.float16), rows * cols * 2)
        else:
            blk, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor_info(name, [rows, cols // blk * size], np.dtype(np.uint8), rows * cols // blk * size,
                              raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, rows, cols in plan:
        w.write_tensor_data(tensor(name, rows, cols))
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--type", default="F16", choices=["F16", "Q8_0", "Q4_0"])
    ap.add_argument("--hidden", type=int, default=TWIN_MEDIUM["hidden_size"])
    ap.add_argument("--ff", type=int, default=TWIN_MEDIUM["intermediate_size"])
    ap.add_argument("--layers", type=int, default=TWIN_MEDIUM["num_hidden_layers"])
    ap.add_argument("--heads", type=int, default=TWIN_MEDIUM["num_attention_heads"])
    ap.add_argument("--kv-heads", type=int, default=TWIN_MEDIUM["num_key_value_heads"])
    ap.add_argument("--vocab", type=int, default=TWIN_MEDIUM["vocab_size"])
    a = ap.parse_args()
    cfg = dict(TWIN_MEDIUM, hidden_size=a.hidden, intermediate_size=a.ff, num_hidden_layers=a.layers,
               num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab)
    p = write_twin(a.out, cfg, qtype=a.type)
    print(f"{p} ({p.stat().st_size / 2**20:.1f} MiB, {n_params(cfg) / 1e6:.1f} M params)")


if __name__ == "__main__":
    main()
