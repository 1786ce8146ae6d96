"""The tokenizer rebuilt from a converted GGUF equals the checkpoint's tokenizer.json."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from sambay.gguf_metadata import GGUFMetadataError, read_metadata
from sambay.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = [
    "Compute 12 + 34 = 46. Then 46 * 3 = 138.",
    "Für Grüße über Straßen: naïve café, 東京 🙂 ∑ √ π",
    "def add(a, b):\n    return a + b\n\n\n",
    "  leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def converted(tiny_gguf):
    ck, out = tiny_gguf("tiny-8")
    return ck, read_metadata(out)


def test_exact_hf_tokenizer(converted):
    ck, meta = converted
    hf = HFTokenizer.from_file(str(ck / "tokenizer.json"))
    tok = Tokenizer.from_metadata(meta)
    assert tok.n_vocab == meta["phi4flash.vocab_size"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids).decode("utf-8") == text


def test_special_tokens_parsed_only_when_asked(converted):
    _, meta = converted
    tok = Tokenizer.from_metadata(meta)
    end = tok.token_to_id("<|end|>")
    with_special = tok.encode("hi<|end|>", special=True)
    assert with_special[-1] == end
    plain = tok.encode("hi<|end|>")
    assert end not in plain and len(plain) > len(with_special)
    assert tok.decode(plain) == b"hi<|end|>"
    # control tokens render only when asked
    assert tok.decode(with_special) == b"hi"
    assert tok.decode(with_special, special=True) == b"hi<|end|>"
    # user-defined (non-special) added tokens are always matched, as in HF and llama.cpp
    tool = tok.token_to_id("<|tool|>")
    assert tok.encode("<|tool|>") == [tool]
    assert tok.eog_ids == {end, tok.token_to_id("<|endoftext|>")}
    assert tok.add_bos is False


def test_fallback_from_llama_cpp_keys(converted):
    _, meta = converted
    exact = Tokenizer.from_metadata(meta)
    slim = {k: v for k, v in meta.items() if k != "tokenizer.huggingface.json"}
    fallback = Tokenizer.from_metadata(slim)
    for text in TEXTS + ["<|user|>x<|end|>"]:
        assert fallback.encode(text) == exact.encode(text)
        assert fallback.encode(text, special=True) == exact.encode(text, special=True)


def test_stream_decoder_never_splits_characters(converted):
    _, meta = converted
    tok = Tokenizer.from_metadata(meta)
    text = "東京 🙂 naïve ∑"
    ids = tok.encode(text)
    assert any(not tok.token_bytes(i).decode("utf-8", errors="ignore") == tok.token_bytes(i).decode(
        "utf-8", errors="replace") for i in ids), "test text should split characters across tokens"
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_errors(converted, tmp_path):
    _, meta = converted
    tok = Tokenizer.from_metadata(meta)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(tok.n_vocab)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_metadata({})
    with pytest.raises(GGUFMetadataError, match="not found"):
        read_metadata(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(GGUFMetadataError, match="not a valid GGUF"):
        read_metadata(bad)


def test_a_merge_without_a_space_is_named():
    """A ``tokenizer.ggml.merges`` entry must be two tokens; one that is not gets its own message
    (the tokenizers library's error for it names neither the key nor the entry)."""
    meta = {"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b", "ab"]}
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.merges holds 'ab', not two tokens"):
        Tokenizer.from_metadata(meta)
    Tokenizer.from_metadata({**meta, "tokenizer.ggml.merges": ["a b"]})  # the well-formed part loads
