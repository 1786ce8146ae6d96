"""Tokenizer metadata, written the way llama.cpp writes a GPT-2-style BPE vocabulary, plus the
exact tokenizer.json text (docs/gguf-format.md, "Tokenizer metadata").

Sources, in order of preference: ``tokenizer.json`` (read as JSON and checked by loading it
with the ``tokenizers`` library; never through transformers, whose GPT2Tokenizer class swaps in
GPT-2's regex, spec §0.1 item 3), else the slow files ``vocab.json`` + ``merges.txt`` (+
``added_tokens.json``). In both, added-token ids win over the base vocabulary: the real
vocab.json holds the special tokens again at ids shifted by one (spec §0.1 trap).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from gguf import GGUFValueType, TokenType

from .errors import ConvertError
from .writer import KV

# o200k_base (the real model's vocabulary, llama.cpp pre-tokenizer "gpt-4o"): 199998 ranks;
# a few ranks checked against OpenAI's o200k_base table (byte-level strings: Ġ = space, Ċ = \n)
O200K_SIZE = 199998
O200K_PROBES = {"!": 0, "ĊĊ": 279, "ing": 289, "Ġthe": 290, "ĠHello": 32949}
EOT_TOKEN = "<|end|>"


@dataclass(frozen=True)
class Vocab:
    """Everything the GGUF stores about the tokenizer."""

    tokens: list[str]  # by id, padded to vocab_size with [PAD{id}]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "a b"
    pre: str
    special_ids: dict[str, Optional[int]]  # bos, eos, padding, unknown
    eot_id: Optional[int]
    eog_ids: list[int]
    add_bos: bool
    add_eos: bool
    chat_template: Optional[Union[str, list[Any]]]
    hf_json: Optional[str]  # the complete tokenizer.json text (None with slow files only)

    def kvs(self) -> list[KV]:
        S, U32, ARR, BOOL = (
            GGUFValueType.STRING,
            GGUFValueType.UINT32,
            GGUFValueType.ARRAY,
            GGUFValueType.BOOL,
        )
        out = [
            KV("tokenizer.ggml.model", "gpt2", S),
            KV("tokenizer.ggml.pre", self.pre, S),
            KV("tokenizer.ggml.tokens", self.tokens, ARR, S),
            KV("tokenizer.ggml.token_type", self.token_types, ARR, GGUFValueType.INT32),
        ]
        if self.merges:
            out.append(KV("tokenizer.ggml.merges", self.merges, ARR, S))
        for which, tid in self.special_ids.items():
            if tid is not None:
                out.append(KV(f"tokenizer.ggml.{which}_token_id", tid, U32))
        if self.eot_id is not None:
            out.append(KV("tokenizer.ggml.eot_token_id", self.eot_id, U32))
        if self.eog_ids:
            out.append(KV("tokenizer.ggml.eog_token_ids", self.eog_ids, ARR, GGUFValueType.INT32))
        out += [
            KV("tokenizer.ggml.add_bos_token", self.add_bos, BOOL),
            KV("tokenizer.ggml.add_eos_token", self.add_eos, BOOL),
        ]
        if isinstance(self.chat_template, str) and self.chat_template:
            out.append(KV("tokenizer.chat_template", self.chat_template, S))
        elif isinstance(self.chat_template, list):  # named templates, as llama.cpp writes them
            names = []
            for t in self.chat_template:
                name, text = t.get("name"), t.get("template")
                if not isinstance(name, str) or not isinstance(text, str):
                    continue
                key = (
                    "tokenizer.chat_template"
                    if name == "default"
                    else f"tokenizer.chat_template.{name}"
                )
                out.append(KV(key, text, S))
                names.append(name)
            if names:
                out.append(KV("tokenizer.chat_templates", names, ARR, S))
        if self.hf_json is not None:
            out.append(KV("tokenizer.huggingface.json", self.hf_json, S))
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConvertError(f"{path.name}: cannot parse: {err}") from None


# an added token: (id, content, special)
_Added = tuple[int, str, bool]


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[_Added], list[str], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConvertError(f"tokenizer.json: cannot read: {err}") from None
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_str(text)  # what the runtime will do with tokenizer.huggingface.json
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise ConvertError(
            f"tokenizer.json: the tokenizers library cannot load it: {err}"
        ) from None
    j = json.loads(text)
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(
            f"tokenizer.json: only BPE tokenizers are supported, got {model.get('type')!r}"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        raise ConvertError("tokenizer.json: model.vocab is not a {token: id} map")
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            merges.append(f"{m[0]} {m[1]}")  # the newer [a, b] form
        else:
            raise ConvertError(f"tokenizer.json: bad merge {m!r}")
    added = []
    for t in j.get("added_tokens") or []:
        if (
            not isinstance(t, dict)
            or not _is_id(t.get("id"))
            or not isinstance(t.get("content"), str)
        ):
            raise ConvertError(f"tokenizer.json: bad added token {t!r}")
        added.append((t["id"], t["content"], bool(t.get("special", False))))
    return vocab, added, merges, text


def _from_slow_files(
    hf_dir: Path, tok_cfg: dict[str, Any]
) -> tuple[dict[str, int], list[_Added], list[str]]:
    vocab = _read_json(hf_dir / "vocab.json")
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        raise ConvertError("vocab.json: not a {token: id} map")
    merges = []
    for line in (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        if len(line.split(" ")) != 2:
            raise ConvertError(f"merges.txt: bad line {line!r}")
        merges.append(line)

    # added tokens: tokenizer_config.added_tokens_decoder (ids + special flags) and
    # added_tokens.json (ids); both beat vocab.json's (possibly shifted) ids
    added: dict[int, tuple[str, Optional[bool]]] = {}
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    for sid, t in decoder.items():
        if (
            not str(sid).isdigit()
            or not isinstance(t, dict)
            or not isinstance(t.get("content"), str)
        ):
            raise ConvertError(f"tokenizer_config.json: bad added_tokens_decoder entry {sid!r}")
        added[int(sid)] = (t["content"], bool(t.get("special", False)))
    if (hf_dir / "added_tokens.json").is_file():
        extra = _read_json(hf_dir / "added_tokens.json")
        if not isinstance(extra, dict) or not all(_is_id(i) for i in extra.values()):
            raise ConvertError("added_tokens.json: not a {token: id} map")
        for content, tid in extra.items():
            if tid in added and added[tid][0] != content:
                raise ConvertError(
                    f"added_tokens.json says {content!r} is id {tid}, tokenizer_config.json says {added[tid][0]!r}"
                )
            added.setdefault(tid, (content, None))
    # without a special flag, a token is special when tokenizer_config names it
    named = {
        _token_content(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    named |= {_token_content(t) for t in tok_cfg.get("additional_special_tokens") or []}
    return (
        vocab,
        [(i, c, s if s is not None else c in named) for i, (c, s) in sorted(added.items())],
        merges,
    )


def _token_content(t: Any) -> Optional[str]:
    if isinstance(t, str):
        return t
    if isinstance(t, dict) and isinstance(t.get("content"), str):
        return t["content"]
    return None


def _is_o200k(vocab: dict[str, int]) -> bool:
    return len(vocab) >= O200K_SIZE and all(vocab.get(t) == i for t, i in O200K_PROBES.items())


def load_vocab(
    hf_dir: Path,
    *,
    n_vocab: int,
    tok_cfg: dict[str, Any],
    config: dict[str, Any],
    allow_missing: bool,
) -> Optional[Vocab]:
    """Read the tokenizer files of a checkpoint folder.

    Args:
        hf_dir: the checkpoint folder.
        n_vocab: ``vocab_size`` (embedding rows); the token list is padded to it.
        tok_cfg: parsed tokenizer_config.json ({} when absent).
        config: parsed config.json (fallback bos/eos/pad ids).
        allow_missing: return None instead of failing when no tokenizer files exist.

    Raises:
        ConvertError: missing (unless allowed) or malformed tokenizer files, more tokens than
            vocab_size, special ids out of range.
    """
    hf_json: Optional[str] = None
    if (hf_dir / "tokenizer.json").is_file():
        base, added, merges, hf_json = _from_tokenizer_json(hf_dir / "tokenizer.json")
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        base, added, merges = _from_slow_files(hf_dir, tok_cfg)
    elif allow_missing:
        return None
    else:
        raise ConvertError(
            f"{hf_dir}: no tokenizer (need tokenizer.json, or vocab.json + merges.txt); "
            "use --no-tokenizer to convert without one"
        )

    # ids -> (token, type); added tokens win over base entries with the same text or id
    added_text = {c for _, c, _ in added}
    added_ids = {i for i, _, _ in added}
    by_id: dict[int, tuple[str, int]] = {}
    for tok, tid in base.items():
        if tok in added_text or tid in added_ids:
            continue
        if tid in by_id:
            raise ConvertError(f"tokenizer: id {tid} is both {by_id[tid][0]!r} and {tok!r}")
        by_id[tid] = (tok, int(TokenType.NORMAL))
    if len(added_ids) != len(added):
        raise ConvertError("tokenizer: two added tokens share one id")
    for tid, content, special in added:
        by_id[tid] = (content, int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
    n_tok = max(by_id) + 1 if by_id else 0
    if n_tok > n_vocab:
        raise ConvertError(f"tokenizer has ids up to {n_tok - 1} but vocab_size is {n_vocab}")
    tokens = [by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED))) for i in range(n_vocab)]
    text_to_id: dict[str, int] = {}
    for i, (t, ty) in enumerate(tokens):
        if ty != TokenType.UNUSED:
            text_to_id.setdefault(t, i)

    def special_id(key: str, config_key: str) -> Optional[int]:
        content = _token_content(tok_cfg.get(key))
        if content is not None and content in text_to_id:
            return text_to_id[content]
        cid = config.get(config_key)
        return cid if _is_id(cid) and cid < n_vocab else None

    special_ids = {
        "bos": special_id("bos_token", "bos_token_id"),
        "eos": special_id("eos_token", "eos_token_id"),
        "padding": special_id("pad_token", "pad_token_id"),
        "unknown": special_id("unk_token", "unk_token_id"),
    }

    gen = (
        _read_json(hf_dir / "generation_config.json")
        if (hf_dir / "generation_config.json").is_file()
        else {}
    )
    eog = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if _is_id(eog):
        eog_ids = [eog]
    elif isinstance(eog, list) and eog and all(_is_id(i) for i in eog):
        eog_ids = list(eog)
    else:
        eog_ids = [special_ids["eos"]] if special_ids["eos"] is not None else []
    bad = [i for i in eog_ids if i >= n_vocab]
    if bad:
        raise ConvertError(
            f"generation_config.json: eos_token_id {bad} out of range (vocab_size {n_vocab})"
        )

    template: Any = tok_cfg.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")

    return Vocab(
        tokens=[t for t, _ in tokens],
        token_types=[ty for _, ty in tokens],
        merges=merges,
        pre="gpt-4o" if _is_o200k(base) else "default",
        special_ids=special_ids,
        eot_id=text_to_id.get(EOT_TOKEN),
        eog_ids=eog_ids,
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
        chat_template=template if isinstance(template, (str, list)) else None,
        hf_json=hf_json,
    )
