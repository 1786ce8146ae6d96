"""sambay.Llama: llama-cpp-python's API shapes, streaming, stops, chat, prefix reuse, state."""

from __future__ import annotations

import numpy as np
import pytest

import sambay
from sambay import Llama


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf):
    return tiny_gguf("tiny-12")[1]


@pytest.fixture()
def llm(gguf_path):
    with Llama(gguf_path, n_ctx=256, n_batch=32, n_threads=2, seed=0, verbose=False) as m:
        yield m


PROMPT = "Compute 12 + 34 = 46. Then"


def test_completion_shape(llm):
    out = llm(PROMPT, max_tokens=8, temperature=0)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("length", "stop")
    n_prompt = len(llm.tokenize(PROMPT))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": out["usage"]["completion_tokens"],
                            "total_tokens": n_prompt + out["usage"]["completion_tokens"]}
    assert 1 <= out["usage"]["completion_tokens"] <= 8


def test_greedy_matches_argmax_of_fresh_evaluation(llm, gguf_path):
    tokens = llm.tokenize(PROMPT)
    got = []
    for t in llm.generate(tokens, temperature=0):
        got.append(t)
        if len(got) == 12:
            break
    # the same by hand on a second context: evaluate, take the argmax, append
    with Llama(gguf_path, n_ctx=256, verbose=False) as other:
        seq = list(tokens)
        other.eval(seq)
        want = []
        for _ in range(12):
            nxt = int(np.argmax(other._last_logits))
            want.append(nxt)
            other.eval([nxt])
    assert got == want


def test_seeded_sampling_is_reproducible(llm):
    a = llm(PROMPT, max_tokens=12, temperature=1.0, seed=42)["choices"][0]["text"]
    b = llm(PROMPT, max_tokens=12, temperature=1.0, seed=42)["choices"][0]["text"]
    c = llm(PROMPT, max_tokens=12, temperature=1.0, seed=43)["choices"][0]["text"]
    assert a == b
    assert a != c


def test_stream_equals_non_stream(llm):
    full = llm(PROMPT, max_tokens=16, temperature=0.9, seed=7)
    chunks = list(llm(PROMPT, max_tokens=16, temperature=0.9, seed=7, stream=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_cut_and_never_leak(llm):
    text = llm(PROMPT, max_tokens=24, temperature=0)["choices"][0]["text"]
    assert len(text) >= 6, text
    stop = text[3:6]  # a stop string that spans token boundaries somewhere
    expected = text[: text.find(stop)]
    out = llm(PROMPT, max_tokens=24, temperature=0, stop=[stop, "never-appears"])
    assert out["choices"][0]["text"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    streamed = ""
    for c in llm(PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True):
        streamed += c["choices"][0]["text"]
        assert stop not in streamed
    assert streamed == expected


def test_chat_completion_and_stream(llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}]
    out = llm.create_chat_completion(messages, max_tokens=10, temperature=0)
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    prompt = "<|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>"
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize(prompt, special=True))
    chunks = list(llm.create_chat_completion(messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_chat_stops_at_end_of_generation_token(gguf_path):
    # make <|end|> the certain next token after a few, through a logits processor
    with Llama(gguf_path, n_ctx=128, verbose=False) as m:
        end = m.tokenizer.token_to_id("<|end|>")

        def biased(input_ids, scores):
            scores[end] = 1e9 if len(input_ids) > 12 else scores[end]
            return scores

        out = m.create_chat_completion([{"role": "user", "content": "hello there"}], max_tokens=50,
                                       logits_processor=biased)
        assert out["choices"][0]["finish_reason"] == "stop"
        assert "<|end|>" not in out["choices"][0]["message"]["content"]


def test_multi_turn_reuses_the_evaluated_prefix(llm, gguf_path):
    a = llm.tokenize(PROMPT)
    b = llm.tokenize(" and then some more words to read")
    first = llm(a, max_tokens=5, temperature=0)
    assert llm.last_timings.prompt_evaluated == len(a)
    # a new prompt that extends the first one (not its generated text): only b is evaluated,
    # from the snapshot taken at the end of prompt a
    second = llm(a + b, max_tokens=6, temperature=0)
    assert llm.last_timings.prompt_evaluated == len(b)
    with Llama(gguf_path, n_ctx=256, verbose=False) as fresh:
        ref = fresh(a + b, max_tokens=6, temperature=0)
        assert fresh.last_timings.prompt_evaluated == len(a) + len(b)
    assert second["choices"][0]["text"] == ref["choices"][0]["text"]
    # continuing exactly where generation stopped evaluates nothing but the new tokens
    ids = llm.input_ids
    before = llm.n_tokens_evaluated
    llm.eval(b)
    assert llm.n_tokens_evaluated - before == len(b)
    assert llm.input_ids == ids + b
    assert first["choices"][0]["text"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("logits_all", [False, True])
@pytest.mark.parametrize("shared", [False, True], ids=["own-context", "shared-context"])
def test_an_eval_stopped_between_micro_batches_keeps_what_the_engine_holds(gguf_path, shared, logits_all):
    """One engine call per eval: eval_progress sees each micro-batch boundary (n_batch 7, 30
    tokens), and an exception raised there after the 2nd leaves exactly 14 tokens evaluated,
    with their logits; the next eval continues as an uninterrupted run. The same through a
    sequence of a shared context, which feeds one micro-batch per step."""
    ids = list(range(3, 33))
    kw = dict(n_ctx=128, n_threads=1, logits_all=logits_all, verbose=False)
    with Llama(gguf_path, n_batch=7, **kw) as whole:  # the same micro-batches, uninterrupted
        whole.eval(ids)
        want_last = whole.scores[-1].copy()
        whole.reset()
        whole.eval(ids[:14])
        want_14 = whole.scores.copy()
    with Llama(gguf_path, n_batch=7, n_seq_max=2 if shared else 1, **kw) as base:
        llm = base.sequence(1) if shared else base
        calls = []

        def progress(done, total):
            calls.append((done, total))
            if (done, total) == (14, 30):
                raise _Stop

        llm.eval_progress = progress
        with pytest.raises(_Stop):
            llm.eval(ids)
        assert calls == [(0, 30), (7, 30), (14, 30)]
        assert llm.n_tokens_evaluated == 14 and llm.input_ids == ids[:14] and llm.n_tokens == 14
        np.testing.assert_array_equal(llm.scores, want_14)
        calls.clear()
        llm.eval(ids[14:])
        assert calls == [(0, 16), (7, 16), (14, 16), (16, 16)]
        assert llm.n_tokens_evaluated == 30 and llm.input_ids == ids
        np.testing.assert_array_equal(llm.scores[-1], want_last)


def test_save_and_load_state(llm, gguf_path):
    llm.eval(llm.tokenize(PROMPT))
    state = llm.save_state()
    cont = llm.tokenize(" more text")
    llm.eval(cont)
    after = llm._last_logits.copy()
    llm.load_state(state)
    assert llm.input_ids == list(state.input_ids)
    llm.eval(cont)
    np.testing.assert_array_equal(llm._last_logits, after)
    # across Llama objects on the same model
    with Llama(gguf_path, n_ctx=256, verbose=False) as other:
        other.load_state(state)
        other.eval(cont)
        np.testing.assert_array_equal(other._last_logits, after)


def test_load_state_rejects_a_token_history_that_does_not_match(llm):
    llm.eval(llm.tokenize(PROMPT))
    state = llm.save_state()
    before = llm.input_ids
    lie = sambay.LlamaState(state.input_ids[:-1] + (state.input_ids[-1] ^ 1,), state.last_logits, state.engine_state)
    with pytest.raises(sambay.StateError, match="token history"):
        llm.load_state(lie)
    short = sambay.LlamaState(state.input_ids[:-1], state.last_logits, state.engine_state)
    with pytest.raises(sambay.StateError, match="positions"):
        llm.load_state(short)
    assert llm.input_ids == before  # a rejected state changes nothing


def test_logprobs(gguf_path):
    with Llama(gguf_path, n_ctx=128, logits_all=True, verbose=False) as m:
        out = m(PROMPT, max_tokens=4, temperature=0, logprobs=3)
        lp = out["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
        for tok_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            assert tok_lp <= 0.0 and len(top) == 3
            assert abs(max(top.values()) - tok_lp) < 1e-5  # greedy picks the top token
        echo = m(PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True)
        text = echo["choices"][0]["text"]
        assert text.startswith(PROMPT)
        elp = echo["choices"][0]["logprobs"]
        n_prompt = len(m.tokenize(PROMPT))
        assert elp["token_logprobs"][0] is None
        assert all(v <= 0 for v in elp["token_logprobs"][1:])
        assert len(elp["tokens"]) == n_prompt + 2
        assert "".join(elp["tokens"]) == text
    with Llama(gguf_path, n_ctx=128, verbose=False) as m:
        with pytest.raises(ValueError, match="logits_all"):
            m(PROMPT, max_tokens=2, logprobs=1, echo=True)


def test_errors(gguf_path, tmp_path, llm):
    with pytest.raises(sambay.LoadError, match="not found"):
        Llama(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world" * 100)
    with pytest.raises(sambay.LoadError):
        Llama(junk)
    # one exception, from the engine's one check: a ContextFullError that is also a ValueError
    # (llama-cpp-python's type and wording), raised before anything is evaluated
    with pytest.raises(sambay.ContextFullError, match=r"^Requested tokens \(300\) exceed context window of 256$") as info:
        llm([5] * 300, max_tokens=1)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert (info.value.n_requested, info.value.n_ctx) == (300, 256)
    before = list(llm.input_ids)
    with pytest.raises(sambay.ContextFullError) as info:
        llm.eval([5] * 257)
    assert (info.value.n_requested, info.value.n_ctx) == (257 + len(before), 256)
    assert llm.input_ids == before  # nothing evaluated
    with pytest.raises(ValueError, match="invalid token id 5000"):
        llm([1, 5000], max_tokens=1)
    with pytest.raises(ValueError, match="invalid token id -1"):
        llm.eval([-1])
    with pytest.raises(ValueError, match="temperature"):
        llm(PROMPT, temperature=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        llm("", max_tokens=1)
    with pytest.raises(ValueError, match="n_ctx"):
        Llama(gguf_path, n_ctx=-1)
    with pytest.raises(sambay.ChatTemplateError):
        llm.create_chat_completion([{"content": "no role"}])


def test_generation_stops_when_the_context_is_full(gguf_path):
    with Llama(gguf_path, n_ctx=32, verbose=False) as m:
        tokens = m.tokenize(PROMPT)
        out = m(tokens, max_tokens=0, temperature=0)  # 0: until the context is full
        assert out["choices"][0]["finish_reason"] in ("length", "stop")
        if out["choices"][0]["finish_reason"] == "length":
            assert len(tokens) + out["usage"]["completion_tokens"] == 32 + 1


def test_contexts_sharing_one_model_run_in_parallel_threads(gguf_path):
    import threading

    from sambay.engine import Model

    with Llama(gguf_path, n_ctx=128, verbose=False) as ref:
        want = {s: ref(PROMPT, max_tokens=12, temperature=1.0, seed=s)["choices"][0]["text"] for s in (1, 2)}
    model = Model(gguf_path)
    a = Llama.from_model(model, n_ctx=128, n_threads=1, verbose=False)
    b = Llama.from_model(model, n_ctx=128, n_threads=1, verbose=False)
    assert a.model is b.model is model and a._ctx is not b._ctx
    got: dict[int, list[str]] = {1: [], 2: []}

    def work(llm: Llama, seed: int) -> None:
        for _ in range(3):
            got[seed].append(llm(PROMPT, max_tokens=12, temperature=1.0, seed=seed)["choices"][0]["text"])

    threads = [threading.Thread(target=work, args=(a, 1)), threading.Thread(target=work, args=(b, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == {1: [want[1]] * 3, 2: [want[2]] * 3}
    # the model must be the one of the path given, and a Model
    with pytest.raises(ValueError, match="not the path"):
        Llama("/elsewhere/m.gguf", model=model)
    with pytest.raises(TypeError, match="sambay.engine.Model"):
        Llama(gguf_path, model="m.gguf")
    a.close()
    assert b(PROMPT, max_tokens=12, temperature=1.0, seed=1)["choices"][0]["text"] == want[1]


def test_stop_must_be_strings_and_a_closed_llama_says_so(gguf_path, llm):
    for bad in (5, [5], b"x", ["a", None]):
        with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
            llm("1", max_tokens=1, stop=bad)
        with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
            llm.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=1, stop=bad)
    m = Llama(gguf_path, n_ctx=64, verbose=False)
    m.close()
    for call in (lambda: m("x", max_tokens=1), lambda: m.eval([1]), m.n_ctx, m.save_state, m.reset):
        with pytest.raises(ValueError, match="^this Llama is closed$"):
            call()
    m.close()  # a second close is harmless


def test_chat_template_kwargs_reach_the_template(llm):
    from sambay.chat import ChatFormatter

    llm._chat = ChatFormatter("{% for m in messages %}{{ m.content }}{% endfor %}"
                              "{% if greeting %}{{ greeting }}{% endif %}")
    msgs = [{"role": "user", "content": "Compute"}]
    plain = llm.create_chat_completion(msgs, max_tokens=1, temperature=0)["usage"]["prompt_tokens"]
    more = llm.create_chat_completion(msgs, max_tokens=1, temperature=0,
                                      chat_template_kwargs={"greeting": " 12 + 34 = 46"})["usage"]["prompt_tokens"]
    assert more > plain
    with pytest.raises(ValueError, match="messages"):
        llm.create_chat_completion(msgs, chat_template_kwargs={"messages": []})


def test_logit_bias_logits_processor_and_stopping_criteria(llm):
    from sambay import LogitsProcessorList, StoppingCriteriaList

    greedy = llm(PROMPT, max_tokens=6, temperature=0)["choices"][0]["text"]
    target = llm.tokenize(" x")[-1]
    piece = llm.tokenizer.token_bytes(target).decode()
    # a large bias makes one token win every step (ids as ints or, as in OpenAI's JSON, strings)
    for bias in ({target: 1000.0}, {str(target): 1000.0}):
        assert llm(PROMPT, max_tokens=4, temperature=0, logit_bias=bias)["choices"][0]["text"] == piece * 4
    # a processor sees the evaluated ids and the scores, and its scores are what is sampled
    seen = []

    def only_target(input_ids, scores):
        seen.append(len(input_ids))
        scores[:] = -np.inf
        scores[target] = 0.0
        return scores

    out = llm(PROMPT, max_tokens=3, temperature=0.9, seed=1, logits_processor=LogitsProcessorList([only_target]))
    assert out["choices"][0]["text"] == piece * 3
    n_prompt = len(llm.tokenize(PROMPT))
    assert seen == [n_prompt, n_prompt + 1, n_prompt + 2]
    # stopping criteria (llama-cpp-python's arguments: the ids evaluated before the new token):
    # stop at the second generated token, its text included
    stop_after = StoppingCriteriaList([lambda ids, logits: len(ids) >= n_prompt + 1])
    out = llm(PROMPT, max_tokens=6, temperature=0, stopping_criteria=stop_after)
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 2
    assert greedy.startswith(out["choices"][0]["text"]) and out["choices"][0]["text"]
    chat = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
                                      logit_bias={target: 1000.0})
    assert chat["choices"][0]["message"]["content"].strip() == (piece * 3).strip()
    for bad in ({"nope": 1.0}, {llm.n_vocab(): 1.0}, {target: float("nan")}):
        with pytest.raises(ValueError, match="logit_bias"):
            llm(PROMPT, max_tokens=1, logit_bias=bad)


def test_mirostat_generation_is_seeded(llm):
    kw = dict(max_tokens=8, temperature=0.9, mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.2)
    a = llm(PROMPT, seed=4, **kw)["choices"][0]["text"]
    assert a == llm(PROMPT, seed=4, **kw)["choices"][0]["text"]
    assert llm(PROMPT, seed=4, **{**kw, "mirostat_mode": 1})["usage"]["completion_tokens"] >= 1
    with pytest.raises(ValueError, match="mirostat"):
        llm(PROMPT, max_tokens=1, mirostat_mode=5)
