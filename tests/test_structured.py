"""Structured output (sambay.structured, llguidance): JSON mode, JSON Schema and GBNF grammars
on the demo model and on random tiny models; the trace stays free; clear errors."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llguidance")

from sambay import Llama  # noqa: E402
from sambay.convert import convert, tiny  # noqa: E402
from sambay.demo import demo_model_path  # noqa: E402
from sambay.errors import MissingDependencyError  # noqa: E402
from sambay.reasoning import THINK_CLOSE, THINK_OPEN  # noqa: E402
from sambay.sampling import mask_logits  # noqa: E402
from sambay.structured import GrammarConstraint, GrammarError, compile_grammar  # noqa: E402

# nested objects, enums, arrays and numbers; bounded, so even a random model ends it
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 9999},
        "op": {"enum": ["add", "sub", "mul"]},
        "digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "minItems": 1, "maxItems": 3},
        "detail": {"type": "object",
                   "properties": {"ok": {"type": "boolean"},
                                  "score": {"type": "number", "minimum": -1, "maximum": 1}},
                   "required": ["ok", "score"], "additionalProperties": False},
    },
    "required": ["answer", "op", "digits", "detail"],
    "additionalProperties": False,
}


# greedy decoding of a tiny model can write digits forever: no unbounded number under greedy
GREEDY_SCHEMA: dict[str, Any] = json.loads(json.dumps(SCHEMA))
GREEDY_SCHEMA["properties"]["detail"]["properties"]["score"] = {"type": "integer", "minimum": -1, "maximum": 1}


def check(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Asserts ``value`` satisfies the JSON Schema keywords the tests use."""
    if "enum" in schema:
        assert value in schema["enum"], where
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), where
        assert set(schema["required"]) <= set(value), where
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), where
        for k, v in value.items():
            check(v, schema["properties"][k], f"{where}.{k}")
    elif kind == "array":
        assert isinstance(value, list), where
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), where
        for i, v in enumerate(value):
            check(v, schema["items"], f"{where}[{i}]")
    elif kind in ("integer", "number"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if kind == "integer":
            assert isinstance(value, int), where
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), where
    elif kind == "boolean":
        assert isinstance(value, bool), where
    elif kind == "string":
        assert isinstance(value, str), where
    else:
        raise AssertionError(f"unknown type {kind}")


@pytest.fixture(scope="module")
def demo():
    with Llama(demo_model_path(), n_ctx=512, n_threads=2, seed=0, verbose=False) as m:
        yield m


@pytest.fixture(scope="module")
def rand(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    ck = tiny.write_checkpoint(root / "ck", "tiny-12", seed=3)
    path = convert(ck, root / "m.gguf", outtype="f32", progress=False)
    with Llama(path, n_ctx=512, n_threads=2, seed=0, verbose=False) as m:
        yield m


QUESTION = [{"role": "user", "content": "What is 347 + 582?"}]


def test_demo_model_answers_in_the_schema_after_a_free_trace(demo):
    free = demo.create_chat_completion(QUESTION, temperature=0, max_tokens=200)["choices"][0]["message"]
    out = demo.create_chat_completion(
        QUESTION, temperature=0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": GREEDY_SCHEMA}})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    check(json.loads(choice["message"]["content"]), GREEDY_SCHEMA)
    # the trace is the model's own, unconstrained
    assert choice["message"]["reasoning_content"] == free["reasoning_content"] != ""


def test_demo_model_json_mode_and_stream(demo):
    kw = dict(temperature=0, max_tokens=200, response_format={"type": "json_object"})
    out = demo.create_chat_completion(QUESTION, **kw)["choices"][0]["message"]["content"]
    assert isinstance(json.loads(out), dict)
    chunks = list(demo.create_chat_completion(QUESTION, stream=True, **kw))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == out


@pytest.mark.parametrize("seed", range(6))
def test_random_model_output_is_schema_valid(rand, seed):
    out = rand.create_completion("Give JSON:", max_tokens=300, temperature=1.0, top_k=0, top_p=1.0,
                                 min_p=0.0, seed=seed, json_schema=SCHEMA)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice["text"]
    check(json.loads(choice["text"]), SCHEMA)


def test_json_schema_as_text_and_response_format_agree(rand):
    a = rand.create_completion("x", max_tokens=300, temperature=0, json_schema=json.dumps(GREEDY_SCHEMA))
    b = rand.create_completion("x", max_tokens=300, temperature=0,
                               response_format={"type": "json_schema", "json_schema": {"schema": GREEDY_SCHEMA}})
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    check(json.loads(a["choices"][0]["text"]), GREEDY_SCHEMA)


def test_a_grammar_that_allows_one_token(rand):
    tok = rand.tokenizer
    # a multi-character normal token: the grammar's only text is that token, then the end
    tid = next(i for i in range(rand.n_vocab() - 1, 0, -1)
               if not tok.is_special(i) and len(tok.token_bytes(i)) >= 3
               and tok.token_bytes(i).decode("ascii", "replace").isalpha())
    text = tok.token_bytes(tid).decode()
    c = GrammarConstraint(compile_grammar(grammar=f'root ::= "{text}"'), tok, rand.n_vocab())
    first = np.flatnonzero(np.unpackbits(c.bitmask().view(np.uint8), bitorder="little"))
    assert tid in first
    for seed in range(3):
        out = rand.create_completion("anything", max_tokens=20, temperature=1.5, top_k=0, top_p=1.0,
                                     min_p=0.0, seed=seed, grammar=f'root ::= "{text}"')
        assert out["choices"][0]["text"] == text
        assert out["choices"][0]["finish_reason"] == "stop"


def test_gbnf_alternatives(rand):
    gbnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    for seed in range(4):
        text = rand.create_completion("?", max_tokens=20, temperature=1.0, seed=seed, grammar=gbnf)["choices"][0]["text"]
        assert text in ("yes", "no") or (text[:-1] == "maybe " and text[-1].isdigit()), text


def test_the_trace_is_free_until_it_closes(demo):
    tok = demo.tokenizer
    grammar = compile_grammar(grammar='root ::= "ok"')
    opened = GrammarConstraint(grammar, tok, demo.n_vocab(), trace="open")
    assert opened.bitmask() is None
    for t in demo.tokenize("Ones: 7+2" + THINK_CLOSE, special=True):
        assert opened.bitmask() is None
        opened.accept(t)
    assert opened.bitmask() is not None and opened.active

    open_ids = demo.tokenize(THINK_OPEN, special=True)
    maybe = GrammarConstraint(grammar, tok, demo.n_vocab(), trace="maybe", open_tokens=open_ids)
    allowed = set(np.flatnonzero(np.unpackbits(maybe.bitmask().view(np.uint8), bitorder="little")))
    assert allowed == {open_ids[0], demo.tokenize("ok")[0]}
    maybe.accept(open_ids[0])
    assert [maybe.forced() for _ in open_ids[1:]] == open_ids[1:]


def test_mask_logits_matches_the_bits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(100).astype(np.float32)
    allowed = rng.random(100) < 0.3
    words = np.zeros(4, dtype=np.uint32)
    for i in np.flatnonzero(allowed):
        words[i // 32] |= np.uint32(1 << (i % 32))
    out = mask_logits(logits, words.view(np.int32))
    assert np.array_equal(np.isfinite(out), allowed)
    assert np.array_equal(out[allowed], logits[allowed])
    # a mask shorter than the logits: the rest is not allowed
    assert not np.isfinite(mask_logits(logits, words[:2].view(np.int32))[64:]).any()


@pytest.mark.parametrize("kw, message", [
    (dict(json_schema={"type": "frobnicate"}), "frobnicate"),
    (dict(json_schema="{not json"), "invalid json_schema"),
    (dict(grammar="root ::= missing"), "missing"),
    (dict(grammar=""), "grammar"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "json_schema"),
    (dict(grammar='root ::= "a"', json_schema={"type": "object"}), "give one"),
])
def test_invalid_constraints_raise_clearly(rand, kw, message):
    with pytest.raises(GrammarError, match=message):
        compile_grammar(**kw)
    with pytest.raises(ValueError, match=message):  # GrammarError is a ValueError
        rand.create_completion("x", max_tokens=2, **kw)


def test_text_response_format_is_no_constraint(rand):
    assert compile_grammar(response_format={"type": "text"}) is None
    a = rand.create_completion("x", max_tokens=5, temperature=0, response_format={"type": "text"})
    assert a["choices"][0]["text"] == rand.create_completion("x", max_tokens=5, temperature=0)["choices"][0]["text"]


def test_missing_llguidance_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(MissingDependencyError, match=r"sambay\[structured\]"):
        compile_grammar(json_schema={"type": "object"})


def test_a_grammar_that_starts_like_the_tag_is_not_taken_for_a_trace(demo):
    open_ids = demo.tokenize(THINK_OPEN, special=True)
    first = demo.tokenizer.token_bytes(open_ids[0]).decode()
    c = GrammarConstraint(compile_grammar(grammar=f'root ::= "{first}b>"'), demo.tokenizer, demo.n_vocab(),
                          trace="maybe", open_tokens=open_ids)
    assert c.bitmask() is not None
    c.accept(open_ids[0])
    assert c.forced() is None and c.active  # the grammar's token, not the start of a trace
