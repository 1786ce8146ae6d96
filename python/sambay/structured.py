"""Structured output: JSON mode, JSON Schema and grammars, with ``llguidance``.

A request's ``response_format`` (OpenAI's ``{"type": "json_object"}`` or ``{"type":
"json_schema", "json_schema": {"schema": ...}}``), ``json_schema`` (llama.cpp's field) or
``grammar`` (GBNF or Lark text, converted by llguidance) becomes one llguidance grammar
(:func:`compile_grammar`). :class:`GrammarConstraint` follows a generation token by token and
gives the set of tokens the grammar allows next as a bitmask; ``Llama.generate`` applies it to
the logits before sampling (:func:`sambay.sampling.mask_logits`), the one place it happens.

For this reasoning model the constraint starts after the trace: a reply that opens with
``<think>`` (or a prompt that opened it) keeps its trace free and the grammar applies from the
text after ``</think>``. Before the reply has chosen, the first token may be the grammar's or the
first token of ``<think>``.

llguidance builds its tokenizer from the GGUF's embedded ``tokenizer.json`` (no torch, no
transformers); it is an optional extra: ``pip install "sambay[structured]"``.
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Optional, Sequence

import numpy as np

from .errors import MissingDependencyError
from .reasoning import THINK_CLOSE
from .tokenizer import Tokenizer


class GrammarError(ValueError):
    """A schema or grammar that cannot be used (the message says why)."""

    param: Optional[str] = None  # the request field that held it, where a server knows


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise MissingDependencyError(
            'structured output (response_format, json_schema, grammar) needs llguidance: '
            'pip install "sambay[structured]"') from None
    return llguidance


# JSON as json.dumps writes it: no whitespace outside strings but after ", " and ": " (with
# llguidance's default of any whitespace anywhere, a small model can fill its budget with spaces)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _schema_of_response_format(response_format: Any) -> Optional[Any]:
    """The JSON schema a ``response_format`` asks for (``{}``-like "any object" for
    json_object), or None for ``{"type": "text"}``."""
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise GrammarError(f"response_format must be an object with a 'type', got {response_format!r}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        # llama-cpp-python's form: {"type": "json_object", "schema": {...}}
        return response_format.get("schema") or {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format json_schema needs a 'json_schema' object "
                               "({'name': ..., 'schema': {...}})")
        # OpenAI's {"name", "schema", "strict"}; a bare schema is accepted too
        schema = spec["schema"] if "schema" in spec else spec
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"response_format json_schema.schema must be an object, got {schema!r}")
        return schema
    raise GrammarError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def compile_grammar(*, response_format: Any = None, json_schema: Any = None,
                    grammar: Optional[str] = None) -> Optional[str]:
    """The llguidance grammar for a request's constraint, or None when there is none.

    Args:
        response_format: OpenAI's ``response_format`` (``text``, ``json_object``,
            ``json_schema``).
        json_schema: a JSON Schema (a dict, or its JSON text).
        grammar: a GBNF grammar (llama.cpp's format; Lark is accepted too).

    Raises:
        GrammarError: more than one constraint, or an invalid schema or grammar.
        MissingDependencyError: llguidance is not installed.
    """
    given = [name for name, v in (("response_format", response_format), ("json_schema", json_schema),
                                  ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise GrammarError(f"give one of response_format, json_schema and grammar, not {' and '.join(given)}")
    if response_format is not None:
        json_schema = _schema_of_response_format(response_format)
        if json_schema is None:
            return None
    if json_schema is None and grammar is None:
        return None
    llg = _llguidance()
    try:
        if json_schema is not None:
            if isinstance(json_schema, str):
                json_schema = json.loads(json_schema)
            if not isinstance(json_schema, (dict, bool)):
                raise GrammarError(f"json_schema must be an object, got {type(json_schema).__name__}")
            compiled = llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_LAYOUT)
        else:
            if not isinstance(grammar, str) or not grammar.strip():
                raise GrammarError("grammar must be a non-empty GBNF text")
            compiled = llg.grammar_from("gbnf", grammar)
    except GrammarError:
        raise
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise GrammarError(f"invalid {'json_schema' if json_schema is not None else 'grammar'}: {err}") from None
    problem = llg.LLMatcher.validate_grammar(compiled)
    if problem:
        raise GrammarError(f"invalid {'json_schema' if json_schema is not None else 'grammar'}: {problem}")
    return compiled


# an llguidance tokenizer per sambay Tokenizer (building one scans the whole vocabulary)
_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tok: Tokenizer, n_vocab: int) -> Any:
    """llguidance's tokenizer for ``tok`` (built once from the same ``tokenizer.json``; the
    end-of-generation tokens end a grammar)."""
    cached = _TOKENIZERS.get(tok)
    if cached is None or cached.vocab_size != n_vocab:
        llg = _llguidance()
        try:
            cached = llg.LLTokenizer(tok.hf_json(), n_vocab=n_vocab, eos_token=sorted(tok.eog_ids) or None)
        except ValueError as err:  # e.g. a GGUF without an end-of-generation token
            raise GrammarError(f"structured output cannot use this model's tokenizer: {err}") from None
        _TOKENIZERS[tok] = cached
    return cached


class GrammarConstraint:
    """Follows one generation and gives the tokens a grammar allows next.

    Args:
        grammar: from :func:`compile_grammar`.
        tok: the model's tokenizer.
        n_vocab: rows of the logits.
        trace: ``"open"``: the prompt opened a ``<think>`` trace (the grammar starts after
            ``</think>``); ``"maybe"``: the reply may open one with ``open_tokens`` (the tag's
            ids); ``"none"``: the grammar applies from the first token.
        open_tokens: the ids of ``<think>`` (for ``"maybe"``).

    Raises:
        GrammarError: the grammar does not fit the tokenizer.
    """

    def __init__(self, grammar: str, tok: Tokenizer, n_vocab: int, *, trace: str = "none",
                 open_tokens: Sequence[int] = ()) -> None:
        llg = _llguidance()
        self._tok = tok
        self._matcher = llg.LLMatcher(grammar_tokenizer(tok, n_vocab), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"invalid grammar: {self._matcher.get_error()}")
        self._bitmask = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)
        self._open = list(open_tokens)
        if trace == "maybe" and not self._open:
            trace = "none"
        self._state = {"open": "thinking", "maybe": "start", "none": "active"}[trace]
        self._queue: list[int] = []  # the rest of <think> once its first token was taken
        self._open_allowed = False  # the tag's first token opens a trace (the grammar has no use for it)
        self._tail = b""  # the end of the trace so far, to find </think>

    @property
    def active(self) -> bool:
        """The grammar decides the next token (the trace, if any, is over)."""
        return self._state in ("start", "active")

    def forced(self) -> Optional[int]:
        """A token that must come next (the rest of an opened ``<think>`` tag), or None."""
        return self._queue.pop(0) if self._queue else None

    def bitmask(self) -> Optional[np.ndarray]:
        """The allowed next tokens, one bit per token (int32 words), or None when free."""
        if not self.active:
            return None
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if self._state == "start":  # the reply may still open a trace
            t = self._open[0]
            words = self._bitmask.view(np.uint32)
            bit = np.uint32(1 << (t % 32))
            # a grammar that itself allows the tag's first token (one starting with "<") keeps it
            self._open_allowed = not words[t // 32] & bit
            words[t // 32] |= bit
        return self._bitmask

    def accept(self, token: int) -> None:
        """The token that was chosen (sampled or forced)."""
        if self._state == "start":
            if token == self._open[0] and self._open_allowed:
                self._state = "thinking"
                self._queue = self._open[1:]
                return
            self._state = "active"
        if self._state == "thinking":
            self._tail = (self._tail + self._tok.token_bytes(token, special=True))[-64:]
            if THINK_CLOSE.encode() in self._tail:
                self._state = "active"
            return
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")


__all__ = ["GrammarConstraint", "GrammarError", "compile_grammar", "grammar_tokenizer"]
