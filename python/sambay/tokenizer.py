"""The tokenizer, rebuilt from a GGUF's metadata, and a UTF-8-safe streaming detokenizer.

The converter embeds the complete ``tokenizer.json`` (``tokenizer.huggingface.json``), so the
exact Hugging Face tokenizer is rebuilt with the ``tokenizers`` library. A GGUF that only has
llama.cpp-style keys (``tokenizer.ggml.tokens`` / ``merges`` / ``pre``) gets an equivalent
byte-level BPE: GPT-2's pre-tokenizer, or o200k's split pattern when ``pre`` is ``gpt-4o``.

Special tokens in the input text are parsed only when asked (``special=True``), as in
llama.cpp; user-defined added tokens (type 4, e.g. the tool tokens) are always matched.
"""

from __future__ import annotations

import codecs
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

# tokenizer.ggml.token_type values (llama.cpp / gguf TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# o200k_base's pre-tokenizer split (OpenAI tiktoken), llama.cpp's "gpt-4o"
_O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


class TokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing or unusable."""


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    char_of = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in char_of.items()}


class Tokenizer:
    """Text <-> token ids for one model.

    Build it with :meth:`from_metadata` from a GGUF's metadata mapping.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        n_vocab: int,
        token_types: Sequence[int],
        bos_id: Optional[int],
        eos_id: Optional[int],
        eog_ids: Sequence[int],
        add_bos: bool,
    ) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._full = hf_tokenizer
        # a copy that splits special tokens written in the text like any other text
        self._plain = HFTokenizer.from_str(hf_tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.n_vocab = n_vocab
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids: frozenset[int] = frozenset(eog_ids)
        self.add_bos = add_bos
        self._types = list(token_types) + [_UNUSED] * max(0, n_vocab - len(token_types))
        self._pieces = self._build_pieces(hf_tokenizer, n_vocab)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Rebuild the tokenizer from a GGUF metadata mapping (key -> value).

        Raises:
            TokenizerError: the metadata has no usable tokenizer (missing, or keys of the wrong
                type or out of range: a GGUF from anywhere must not fail any other way).
        """
        try:
            return cls._from_metadata(meta)
        except TokenizerError:
            raise
        except Exception as err:  # noqa: BLE001 - file data: the tokenizers library raises plain Exception
            raise TokenizerError(f"the GGUF's tokenizer metadata is invalid: {type(err).__name__}: {err}") from err

    @classmethod
    def _from_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        for key, kind in (("tokenizer.ggml.tokens", list), ("tokenizer.ggml.token_type", list),
                          ("tokenizer.ggml.merges", list), ("tokenizer.huggingface.json", str),
                          ("tokenizer.ggml.eog_token_ids", list)):
            if meta.get(key) is not None and not isinstance(meta[key], kind):
                raise TokenizerError(f"metadata key '{key}' has the wrong type ({type(meta[key]).__name__})")
        n_tok = len(meta.get("tokenizer.ggml.tokens") or [])
        if meta.get("tokenizer.ggml.token_type") is not None and len(meta["tokenizer.ggml.token_type"]) != n_tok:
            raise TokenizerError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            v = meta.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_tok):
                raise TokenizerError(f"metadata key '{key}' = {v!r} is not a token id (n_tokens {n_tok})")
        for v in meta.get("tokenizer.ggml.eog_token_ids") or []:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_tok:
                raise TokenizerError(f"tokenizer.ggml.eog_token_ids holds {v!r}, not a token id")

        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("the GGUF has no tokenizer (converted with --no-tokenizer?)")
        tokens = list(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        hf_json = meta.get("tokenizer.huggingface.json")
        if hf_json:
            try:
                hf = HFTokenizer.from_str(hf_json)
            except Exception as err:  # tokenizers raises plain Exception
                raise TokenizerError(f"tokenizer.huggingface.json is not a valid tokenizer: {err}") from err
        else:
            try:
                hf = cls._from_ggml_vocab(tokens, types, list(meta.get("tokenizer.ggml.merges") or []),
                                          str(meta.get("tokenizer.ggml.pre", "default")))
            except TokenizerError:
                raise
            except Exception as err:  # tokenizers raises plain Exception (e.g. a merge of unknown tokens)
                raise TokenizerError(f"the GGUF's tokenizer.ggml.* vocabulary is not usable: {err}") from err

        def opt_id(key: str) -> Optional[int]:
            v = meta.get(key)
            return int(v) if v is not None else None

        eos = opt_id("tokenizer.ggml.eos_token_id")
        eog = [int(t) for t in meta.get("tokenizer.ggml.eog_token_ids") or []]
        if not eog:
            eog = [t for t in (eos, opt_id("tokenizer.ggml.eot_token_id")) if t is not None]
        return cls(
            hf,
            n_vocab=len(tokens),
            token_types=types,
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_id=eos,
            eog_ids=eog,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @staticmethod
    def _from_ggml_vocab(tokens: list[str], types: list[int], merges: list[str], pre: str) -> Any:
        """A byte-level BPE from llama.cpp-style keys (no tokenizer.json in the GGUF)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _BYTE)}
        pairs: list[tuple[str, str]] = []
        for m in merges:
            left, space, right = str(m).partition(" ")
            if not space:
                raise TokenizerError(f"tokenizer.ggml.merges holds {m!r}, not two tokens separated by a space")
            pairs.append((left, right))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
        if pre == "gpt-4o":
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_O200K_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        for i, t in enumerate(tokens):
            if types[i] in (_CONTROL, _USER_DEFINED):
                added = AddedToken(t, special=types[i] == _CONTROL, normalized=False)
                (hf.add_special_tokens if types[i] == _CONTROL else hf.add_tokens)([added])
        return hf

    def _build_pieces(self, hf: Any, n_vocab: int) -> list[bytes]:
        """The bytes each token id stands for (special tokens: their text)."""
        byte_of = _byte_level_alphabet()
        added = {t.content for t in hf.get_added_tokens_decoder().values()}
        pieces: list[bytes] = []
        for i in range(n_vocab):
            tok = hf.id_to_token(i)
            if tok is None:
                pieces.append(b"")
            elif tok in added or any(c not in byte_of for c in tok):
                pieces.append(tok.encode("utf-8"))
            else:
                pieces.append(bytes(byte_of[c] for c in tok))
        return pieces

    # ------------------------------------------------------------------ use

    def encode(self, text: Union[str, bytes], *, add_bos: Optional[bool] = None,
               special: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the text (a ``bytes`` object is decoded as UTF-8, invalid bytes replaced).
            add_bos: prepend the BOS token (default: the GGUF's ``add_bos_token``, false for
                Phi-4-mini-flash).
            special: recognise special tokens such as ``<|end|>`` written in the text.
        """
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        elif isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                # lone surrogates (e.g. surrogateescape'd bytes from argv or a file name) are not
                # text: U+FFFD, as for invalid UTF-8 bytes
                text = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
        ids = (self._full if special else self._plain).encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def is_special(self, token_id: int) -> bool:
        """Whether a token is a control token (rendered only when asked)."""
        return self._types[token_id] == _CONTROL

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The bytes of one token (control tokens give b"" unless ``special``)."""
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")
        if not special and self._types[token_id] == _CONTROL:
            return b""
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], *, special: bool = False) -> bytes:
        """The bytes of a token sequence (may end inside a multi-byte character)."""
        return b"".join(self.token_bytes(int(t), special=special) for t in ids)

    def __call__(self) -> "LlamaCppTokenizer":
        """llama-cpp-python's ``llm.tokenizer()``: this tokenizer with its ``LlamaTokenizer``
        methods and defaults (``llm.tokenizer`` itself is this object)."""
        return LlamaCppTokenizer(self)

    def hf_json(self) -> str:
        """The tokenizer as Hugging Face's ``tokenizer.json`` text (what llguidance builds from)."""
        return self._full.to_str()

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string (e.g. ``"<|end|>"``), or None."""
        return self._full.token_to_id(token)


class LlamaCppTokenizer:
    """llama-cpp-python's ``LlamaTokenizer`` over a :class:`Tokenizer`: ``tokenize``/``encode``
    parse special tokens and add BOS when the model does, unless told otherwise;
    ``detokenize`` gives bytes and ``decode`` text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._tok.encode(text, add_bos=None if add_bos else False, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        return self._tok.decode(tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")


class StreamDecoder:
    """Turns tokens into text one at a time without splitting multi-byte characters.

    ``feed`` returns only complete characters; bytes of a character that is still incomplete
    wait for the next token. ``flush`` returns what is left (invalid bytes as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
