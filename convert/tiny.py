"""Seeded random SambaY checkpoints in the exact Hugging Face layout, for tests and benchmarks.

``write_checkpoint`` writes a folder shaped like ``microsoft/Phi-4-mini-flash-reasoning``:
``config.json`` (the real keys, ``architectures: ["Phi4FlashForCausalLM"]``), safetensors
(one file, or shards plus ``model.safetensors.index.json``) with the real tensor names (spec
§3, no ``lm_head.weight``), a byte-level BPE ``tokenizer.json`` trained with ``tokenizers``,
``tokenizer_config.json`` with a Phi-4-mini-style chat template and the real special tokens,
and ``generation_config.json``.

Every parameter is randomised so that it matters (spec §12 and §0.1 item 8): LayerNorm
weights and biases, conv and dt biases, D, sub-norm weights, λ vectors (std 0.3, so
λ ≠ λ_init), A_log = log(1..d_state) + noise, and x_proj/dt_proj at std 0.1 so that the scan
term is well above f32 noise. Each tensor comes from its own generator seeded by
(seed, tensor name), so tensors are written one at a time: a full-size random model streams to
disk without ever being whole in memory. No torch needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from .hparams import MODEL_TYPE
from .schedule import LayerKind, layer_kinds

# ---------------------------------------------------------------------------------------------
# configs

_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["Phi4FlashForCausalLM"],
    "model_type": MODEL_TYPE,
    "auto_map": {
        "AutoConfig": "configuration_phi4flash.Phi4FlashConfig",
        "AutoModelForCausalLM": "modeling_phi4flash.Phi4FlashForCausalLM",
    },
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "lm_head_bias": False,
    "mlp_bias": False,
    "mb_per_layer": 2,
    "rope_theta": 10000.0,  # dead parameter: SambaY has no RoPE
    "tie_word_embeddings": True,
    "use_cache": True,
    "_attn_implementation": "flash_attention_2",
}

CONFIGS: dict[str, dict[str, Any]] = {
    # spec §12 "tiny-12": >= 2 of every cross-decoder kind, 3 SWA layers; no mamba_* keys,
    # like the real config.json (the defaults d_state 16, d_conv 4, expand 2, dt_rank auto apply)
    "tiny-12": {
        **_BASE_CONFIG,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 1024,
        "sliding_window": 16,
        "max_position_embeddings": 4096,
    },
    # spec §12 "tiny-8" (the MB parity test's shape), with explicit mamba_* keys
    "tiny-8": {
        **_BASE_CONFIG,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 640,
        "sliding_window": 8,
        "max_position_embeddings": 2048,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
    },
    # the real Phi-4-mini-flash-reasoning shape (spec §1.1), for benchmarks
    "phi4-mini-flash": {
        **_BASE_CONFIG,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 40,
        "num_key_value_heads": 20,
        "vocab_size": 200064,
        "sliding_window": 512,
        "max_position_embeddings": 262144,
    },
}

# The real model's special tokens (spec §9, §0.1 item 3), in id order. (content, special, rstrip)
SPECIAL_TOKENS: list[tuple[str, bool, bool]] = [
    ("<|endoftext|>", True, False),
    ("<|endofprompt|>", True, False),
    ("<|assistant|>", True, True),
    ("<|end|>", True, True),
    ("<|user|>", True, True),
    ("<|system|>", True, True),
    ("<|tool|>", False, True),
    ("<|/tool|>", False, True),
    ("<|tool_call|>", False, True),
    ("<|/tool_call|>", False, True),
    ("<|tool_response|>", False, True),
    ("<|tag|>", True, False),
]

# Phi-4-mini style: each message is <|role|>content<|end|>; a system message carrying tools gets
# <|tool|>TOOLS<|/tool|> before its <|end|>; then <|assistant|> or the eos token. No default
# system line.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools']"
    " + '<|/tool|>' + '<|end|>' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# hparams needed to lay out the tensors (the converter validates configs properly)


def _dims(cfg: dict[str, Any]) -> dict[str, int]:
    d = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    dt_rank = cfg.get("mamba_dt_rank", "auto")
    return {
        "d": d,
        "ff": int(cfg["intermediate_size"]),
        "n_layer": int(cfg["num_hidden_layers"]),
        "n_head": n_head,
        "n_head_kv": int(cfg["num_key_value_heads"]),
        "hd": d // n_head,
        "vocab": int(cfg["vocab_size"]),
        "d_state": int(cfg.get("mamba_d_state", 16)),
        "d_conv": int(cfg.get("mamba_d_conv", 4)),
        "d_inner": int(cfg.get("mamba_expand", 2)) * d,
        "dt_rank": math.ceil(d / 16) if dt_rank == "auto" else int(dt_rank),
    }


# ---------------------------------------------------------------------------------------------
# tensors

# An initialiser draws a float32 array of the given shape from the given generator.
_Init = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def _normal(std: float, mean: float = 0.0) -> _Init:
    return lambda rng, shape: (mean + std * rng.standard_normal(shape)).astype(np.float32)


def _a_log(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    d_inner, d_state = shape
    base = np.log(np.arange(1, d_state + 1, dtype=np.float64))
    return (base[None, :] + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def _dt_bias(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Mamba's init: dt log-uniform in [1e-3, 1e-1], bias = softplus^-1(dt)
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)


def tensor_specs(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], _Init, bool]]:
    """Every tensor of the checkpoint: (HF name, shape, initialiser, stored_f32_always).

    ``stored_f32_always`` marks A_log and the λ vectors, which the real checkpoint stores in F32
    even though everything else is BF16 (spec §0.1 item 4).
    """
    g = _dims(cfg)
    d, ff, d_inner, hd = g["d"], g["ff"], g["d_inner"], g["hd"]
    kinds = layer_kinds(g["n_layer"], int(cfg.get("mb_per_layer", 2)))
    lin, proj = _normal(0.02), _normal(0.1)
    ln_w, ln_b = _normal(0.1, 1.0), _normal(0.1)

    specs: list[tuple[str, tuple[int, ...], _Init, bool]] = [
        ("model.embed_tokens.weight", (g["vocab"], d), lin, False),
    ]
    for i, kind in enumerate(kinds):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,), ln_w, False),
            (p + "input_layernorm.bias", (d,), ln_b, False),
            (p + "post_attention_layernorm.weight", (d,), ln_w, False),
            (p + "post_attention_layernorm.bias", (d,), ln_b, False),
            (p + "mlp.fc1.weight", (2 * ff, d), lin, False),
            (p + "mlp.fc2.weight", (d, ff), lin, False),
        ]
        a = p + "attn."
        if kind == LayerKind.MAMBA:
            specs += [
                (a + "in_proj.weight", (2 * d_inner, d), lin, False),
                (a + "conv1d.weight", (d_inner, 1, g["d_conv"]), _normal(0.3), False),
                (a + "conv1d.bias", (d_inner,), _normal(0.1), False),
                (a + "x_proj.weight", (g["dt_rank"] + 2 * g["d_state"], d_inner), proj, False),
                (a + "dt_proj.weight", (d_inner, g["dt_rank"]), proj, False),
                (a + "dt_proj.bias", (d_inner,), _dt_bias, False),
                (a + "A_log", (d_inner, g["d_state"]), _a_log, True),
                (a + "D", (d_inner,), _normal(0.3, 1.0), False),
                (a + "out_proj.weight", (d, d_inner), lin, False),
            ]
        elif kind == LayerKind.GMU:
            specs += [
                (a + "in_proj.weight", (d_inner, d), lin, False),
                (a + "out_proj.weight", (d, d_inner), lin, False),
            ]
        else:
            n_qkv = g["n_head"] * hd
            if kind != LayerKind.ATTN_CROSS:
                n_qkv += 2 * g["n_head_kv"] * hd
            lam = _normal(0.3)
            specs += [
                (a + "Wqkv.weight", (n_qkv, d), lin, False),
                (a + "Wqkv.bias", (n_qkv,), _normal(0.1), False),
                (a + "out_proj.weight", (d, d), lin, False),
                (a + "out_proj.bias", (d,), _normal(0.1), False),
                (a + "inner_cross_attn.lambda_q1", (hd,), lam, True),
                (a + "inner_cross_attn.lambda_k1", (hd,), lam, True),
                (a + "inner_cross_attn.lambda_q2", (hd,), lam, True),
                (a + "inner_cross_attn.lambda_k2", (hd,), lam, True),
                (a + "inner_cross_attn.subln.weight", (2 * hd,), ln_w, False),
            ]
    specs += [
        ("model.final_layernorm.weight", (d,), ln_w, False),
        ("model.final_layernorm.bias", (d,), ln_b, False),
    ]
    return specs


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# safetensors writing (streamed; bf16 without torch)

_ST_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def _write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...], str]], data: Iterator[bytes]
) -> int:
    """Write one safetensors file. ``entries`` = (name, shape, st_dtype) in file order;
    ``data`` yields each tensor's bytes in the same order. Returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, st_dtype in entries:
        size = int(np.prod(shape, dtype=np.int64)) * (4 if st_dtype == "F32" else 2)
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for chunk in data:
            f.write(chunk)
    return offset


# ---------------------------------------------------------------------------------------------
# tokenizer

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A state space model keeps a fixed-size memory of everything it has read, while attention
looks back over a window of recent tokens. The decoder-hybrid-decoder design shares one
key-value cache across the cross-decoder and gates a memory read with a small unit.
Compute 12 + 34 = 46. Then 46 * 3 = 138, and 138 - 7 = 131. Numbers: 0 1 2 3 4 5 6 7 8 9.
Reasoning step by step: first add the tens, then the ones, then carry. The answer is 42.
Für Grüße über Straßen: naïve café, déjà vu, 東京, 数学, emoji 🙂 and symbols ∑ ∫ √ π.
def add(a, b):
    return a + b
print(add(2, 3))  # 5
"""


def train_byte_level_bpe(texts: Iterable[str], n_trained: int, vocab_size: int) -> Any:
    """A byte-level BPE with ``n_trained`` ids trained on ``texts``, then the real special
    tokens appended after them (ids in :data:`SPECIAL_TOKENS` order). Deterministic.

    Raises:
        ValueError: ``n_trained`` leaves no room for merges, or the result exceeds
            ``vocab_size`` ids.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if n_trained < 256 + 16:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for content, special, rstrip in SPECIAL_TOKENS:
        added = AddedToken(content, special=special, rstrip=rstrip, lstrip=False, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids > vocab_size {vocab_size}")
    return tok


def build_tokenizer(vocab_size: int) -> Any:
    """The test checkpoints' tokenizer: trained on a small built-in corpus."""
    n_trained = min(vocab_size - len(SPECIAL_TOKENS), 256 + 700)
    return train_byte_level_bpe([_CORPUS] * 4, n_trained, vocab_size)


def _write_tokenizer_files(out: Path, cfg: dict[str, Any]) -> dict[str, int]:
    tok = build_tokenizer(int(cfg["vocab_size"]))
    tok.save(str(out / "tokenizer.json"))
    ids = {content: tok.token_to_id(content) for content, _, _ in SPECIAL_TOKENS}
    decoder = {
        str(ids[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": rstrip,
            "single_word": False,
            "special": special,
        }
        for content, special, rstrip in SPECIAL_TOKENS
    }
    eos = "<|endoftext|>"
    tok_cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": eos,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": int(cfg["max_position_embeddings"]),
        "pad_token": eos,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": eos,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    special_map = {k: {"content": eos, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False} for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return ids


# ---------------------------------------------------------------------------------------------
# the folder


def make_config(
    config: Union[str, dict[str, Any]] = "tiny-12",
    *,
    config_style: str = "int",
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The config.json dict of a named (or given) config, in one of the three styles.

    ``config_style``: ``"int"`` (the real file: ``sliding_window`` an int, the layer rule
    applies), ``"list"`` (the original revision: a per-layer list, None where there is no
    window) or ``"layer_types"`` (int window plus a ``layer_types`` list).
    """
    cfg = dict(CONFIGS[config] if isinstance(config, str) else config)
    cfg.update(overrides or {})
    kinds = layer_kinds(int(cfg["num_hidden_layers"]), int(cfg.get("mb_per_layer", 2)))
    window = cfg["sliding_window"]
    if config_style == "list":
        cfg["sliding_window"] = [window if k == LayerKind.ATTN_SWA else None for k in kinds]
    elif config_style == "layer_types":
        cfg["layer_types"] = [
            "sliding_attention" if k == LayerKind.ATTN_SWA else "full_attention" for k in kinds
        ]
    elif config_style != "int":
        raise ValueError(f"unknown config_style {config_style!r}")
    return cfg


def write_checkpoint(
    out_dir: Union[str, Path],
    config: Union[str, dict[str, Any]] = "tiny-12",
    *,
    seed: int = 0,
    dtype: str = "float32",
    sharded: bool = False,
    config_style: str = "int",
    tokenizer: bool = True,
    overrides: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a random SambaY checkpoint folder in the Hugging Face layout.

    Args:
        out_dir: the folder to create (it may exist).
        config: a name from :data:`CONFIGS` or a config dict.
        seed: the same seed gives the same weights, whatever the dtype, sharding or style.
        dtype: ``"float32"`` or ``"bfloat16"`` (A_log and λ stay F32, as in the real file).
        sharded: two shards plus ``model.safetensors.index.json`` instead of one file.
        config_style: see :func:`make_config`.
        tokenizer: write tokenizer.json, tokenizer_config.json, special_tokens_map.json.
        overrides: config keys to change (e.g. ``{"sliding_window": 8}``).

    Returns:
        The folder path.
    """
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(config, config_style=config_style, overrides=overrides)
    cfg["torch_dtype"] = dtype

    if tokenizer:
        ids = _write_tokenizer_files(out, cfg)
        eos, end = ids["<|endoftext|>"], ids["<|end|>"]
    else:
        eos = end = int(cfg["vocab_size"]) - 1
    cfg.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"_from_model_config": True, "bos_token_id": eos, "eos_token_id": [end, eos],
               "pad_token_id": eos, "transformers_version": "4.46.1"}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))

    specs = tensor_specs(cfg)
    st_dtype = _ST_DTYPES[dtype][0]
    entries = [(name, shape, "F32" if keep_f32 else st_dtype) for name, shape, _, keep_f32 in specs]

    def tensor_bytes(sel: list[int]) -> Iterator[bytes]:
        for k in sel:
            name, shape, init, _ = specs[k]
            x = init(_tensor_rng(seed, name), shape)
            if entries[k][2] == "BF16":
                yield to_bf16_bits(x).tobytes()
            else:
                yield x.tobytes()

    if not sharded:
        _write_safetensors(out / "model.safetensors", entries, tensor_bytes(list(range(len(specs)))))
        return out

    # two shards, split by bytes like HF's max_shard_size
    sizes = [int(np.prod(s, dtype=np.int64)) * (4 if t == "F32" else 2) for _, s, t in entries]
    half, acc, cut = sum(sizes) / 2, 0, len(sizes)
    for k, size in enumerate(sizes):
        acc += size
        if acc >= half:
            cut = k + 1
            break
    cut = min(max(cut, 1), len(sizes) - 1)
    shards = [list(range(0, cut)), list(range(cut, len(sizes)))]
    weight_map: dict[str, str] = {}
    for n, sel in enumerate(shards, start=1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, [entries[k] for k in sel], tensor_bytes(sel))
        weight_map.update({entries[k][0]: fname for k in sel})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def expected_tensor_count(cfg: dict[str, Any]) -> int:
    """Number of tensors in a checkpoint of this config (434 for the real model)."""
    return len(tensor_specs(cfg))


__all__ = [
    "CONFIGS",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "bf16_bits_to_f32",
    "build_tokenizer",
    "train_byte_level_bpe",
    "expected_tensor_count",
    "make_config",
    "tensor_specs",
    "to_bf16_bits",
    "write_checkpoint",
]
