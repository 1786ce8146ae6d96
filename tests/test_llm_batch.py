"""Continuous batching in the Python API: ``Llama(n_seq_max=N).sequence(i)`` views used from
several threads, and ``sambay.LLM`` (vLLM's shape). Every prompt gets the text it gets alone,
and the sequences' evaluations really ran together (fewer engine steps than tokens)."""

from __future__ import annotations

import threading

import pytest

from sambay import LLM, GenerationParams, Llama, demo_model_path

KW = dict(n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
PROMPTS = ["12+34=", "What is 457 - 286?", "7*8=", "100-1=", "3+4+5=", "99*2=", "61-17=", "5*5="]


@pytest.fixture(scope="module")
def alone():
    """Each prompt's greedy completion on a single-sequence Llama."""
    llm = Llama(demo_model_path(), **KW)
    return {p: llm.create_completion(p, max_tokens=40, temperature=0)["choices"][0] for p in PROMPTS}


@pytest.fixture(scope="module")
def batched():
    return LLM(demo_model_path(), n_seq_max=4, **KW)


def test_generate_equals_each_prompt_alone(alone, batched):
    shared = batched.llama._shared
    steps0, rows0 = shared.steps, shared.rows
    outs = batched.generate(PROMPTS, GenerationParams(max_tokens=40, temperature=0))
    assert [o.index for o in outs] == list(range(len(PROMPTS)))
    for o, p in zip(outs, PROMPTS):
        assert o.prompt == p
        assert o.outputs[0].text == alone[p]["text"], p
        assert o.outputs[0].finish_reason == alone[p]["finish_reason"]
    # the sequences ran together: more than one sequence per engine step on average
    steps, rows = shared.steps - steps0, shared.rows - rows0
    assert rows / steps > 1.5, f"{rows} sequence entries in {steps} steps"


def test_generate_stream_pieces_add_up(alone, batched):
    texts = {i: "" for i in range(len(PROMPTS))}
    reasons = {}
    for i, piece, reason in batched.generate_stream(PROMPTS, {"max_tokens": 40, "temperature": 0}):
        texts[i] += piece
        if reason is not None:
            reasons[i] = reason
    for i, p in enumerate(PROMPTS):
        assert texts[i] == alone[p]["text"]
        assert reasons[i] == alone[p]["finish_reason"]


def test_one_prompt_of_token_ids_is_one_prompt(alone, batched):
    """A single list of token ids is one prompt (as a single text is), not a list of prompts."""
    ids = batched.llama.tokenize(PROMPTS[0].encode())
    params = GenerationParams(max_tokens=40, temperature=0)
    (out,) = batched.generate(ids, params)
    assert out.prompt == ids
    assert out.outputs[0].text == alone[PROMPTS[0]]["text"]
    assert [o.outputs[0].text for o in batched.generate([ids, PROMPTS[1]], params)] == \
        [alone[p]["text"] for p in PROMPTS[:2]]
    pieces = [(i, piece) for i, piece, _ in batched.generate_stream(ids, params)]
    assert {i for i, _ in pieces} == {0} and "".join(p for _, p in pieces) == alone[PROMPTS[0]]["text"]


def test_per_prompt_parameters_and_seeds():
    single = Llama(demo_model_path(), **KW)
    params = [GenerationParams(max_tokens=24, temperature=1.0, seed=s) for s in range(4)]
    prompts = PROMPTS[:4]
    want = [single.create_completion(p, max_tokens=24, temperature=1.0, seed=s)["choices"][0]["text"]
            for p, s in zip(prompts, range(4))]
    with LLM(demo_model_path(), n_seq_max=3, **KW) as llm:
        got = [o.outputs[0].text for o in llm.generate(prompts, params)]
    assert got == want
    with pytest.raises(ValueError, match="3 parameter sets for 4 prompts"):
        LLM(demo_model_path(), n_seq_max=2, **KW).generate(prompts, params[:3])
    with pytest.raises(ValueError, match="unknown generation parameter"):
        GenerationParams.of({"max_token": 3})


def test_chat_keeps_reasoning_apart(batched):
    convs = [[{"role": "user", "content": q}] for q in ("What is 12 + 34?", "What is 7 * 8?")]
    outs = batched.chat(convs, GenerationParams(max_tokens=80, temperature=0))
    single = Llama(demo_model_path(), **KW)
    for conv, o in zip(convs, outs):
        want = single.create_chat_completion(conv, max_tokens=80, temperature=0)["choices"][0]["message"]
        assert o.outputs[0].text == want["content"]
        assert o.outputs[0].reasoning_content == want.get("reasoning_content")
        assert "<think>" not in o.outputs[0].text


def test_sequence_views_in_threads_and_a_context_full_stays_with_its_sequence():
    base = Llama(demo_model_path(), n_seq_max=3, **{**KW, "n_ctx": 48})
    views = [base.sequence(i) for i in range(3)]
    long_prompt = "1+1=" * 40  # over 48 tokens
    results: dict[int, object] = {}

    def run(i: int, prompt: str) -> None:
        try:
            results[i] = views[i].create_completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
        except Exception as err:  # noqa: BLE001
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(["12+34=", long_prompt, "7*8="])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    single = Llama(demo_model_path(), **{**KW, "n_ctx": 48})
    assert results[0] == single.create_completion("12+34=", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert results[2] == single.create_completion("7*8=", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert isinstance(results[1], ValueError)  # ContextFullError is a ValueError
    with pytest.raises(ValueError, match="out of range"):
        base.sequence(3)
    with pytest.raises(ValueError, match="one sequence"):
        single.sequence(0)


def test_cancel_one_sequence_leaves_the_other():
    base = Llama(demo_model_path(), n_seq_max=2, **KW)
    a, b = base.sequence(0), base.sequence(1)
    got: dict[str, object] = {}

    def long_run() -> None:
        try:
            got["a"] = list(zip(range(10_000), a.generate(a.tokenize("1+1="), temperature=0)))
        except Exception as err:  # noqa: BLE001
            got["a"] = err

    t = threading.Thread(target=long_run)
    t.start()
    text = b.create_completion("12+34=", max_tokens=20, temperature=0)["choices"][0]["text"]
    a.cancel()
    t.join(60)
    assert not t.is_alive()
    assert type(got["a"]).__name__ == "AbortedError"
    single = Llama(demo_model_path(), **KW)
    assert text == single.create_completion("12+34=", max_tokens=20, temperature=0)["choices"][0]["text"]
    # the cancelled sequence is usable again
    assert a.create_completion("7*8=", max_tokens=8, temperature=0)["choices"][0]["text"] == \
        single.create_completion("7*8=", max_tokens=8, temperature=0)["choices"][0]["text"]


def test_one_llama_refuses_a_second_generation_at_the_same_time():
    llm = Llama(demo_model_path(), **KW)
    want = llm.create_completion("12+34=", max_tokens=12, temperature=0)["choices"][0]["text"]
    # two interleaved streams: the second one raises when it starts, the first is unharmed
    a = llm.create_completion("12+34=", max_tokens=12, temperature=0, stream=True)
    first = next(a)["choices"][0]["text"]
    b = llm.create_completion("7*8=", max_tokens=12, temperature=0, stream=True)
    with pytest.raises(RuntimeError, match="already generating"):
        next(b)
    rest = "".join(c["choices"][0]["text"] for c in a)
    assert first + rest == want
    # a stream left open and then dropped does not block the next call
    c = llm.create_completion("7*8=", max_tokens=12, temperature=0, stream=True)
    next(c)
    del c
    assert llm.create_completion("12+34=", max_tokens=12, temperature=0)["choices"][0]["text"] == want


def test_one_llama_in_two_threads_raises_instead_of_corrupting():
    llm = Llama(demo_model_path(), **KW)
    single = Llama(demo_model_path(), **KW)
    prompts = ["12+34=", "7*8="]
    want = {p: single.create_completion(p, max_tokens=30, temperature=0)["choices"][0]["text"] for p in prompts}
    barrier = threading.Barrier(2)
    got: dict[str, object] = {}

    def run(p: str) -> None:
        barrier.wait()
        try:
            for _ in range(20):
                got[p] = llm.create_completion(p, max_tokens=30, temperature=0)["choices"][0]["text"]
                assert got[p] == want[p]
        except RuntimeError as err:
            got[p] = err

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # every completed text is right; a clash shows up as a clear error, never as wrong text
    for p in prompts:
        assert got[p] == want[p] or ("already generating" in str(got[p]) or "another thread" in str(got[p]))
