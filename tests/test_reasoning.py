"""The ``<think>`` trace kept apart from the answer (``reasoning_content``) and the reasoning
budget, in the splitter itself, the Python API, the server and the CLI. The built-in demo model
answers ``<think>TRACE</think>The answer is N.`` (greedy at temperature 0)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from sambay import Llama
from sambay import reasoning
from sambay.demo import demo_model_path
from sambay.reasoning import ReasoningSplitter

QUESTION = [{"role": "user", "content": "What is 457 - 286?"}]
TRACE = "Ones: 7-6-0=1, borrow 0. Tens: 15-8-0=7, borrow 1. Hundreds: 4-2-1=1, borrow 0."
ANSWER = "The answer is 171."


# ---------------------------------------------------------------------------------------------
# the splitter


def split(pieces, **kw) -> tuple[str, str]:
    s = ReasoningSplitter(**kw)
    out = [s.feed(p) for p in pieces] + [s.flush()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


TEXT = "  <think>\nsome <b>trace</b> 1 < 2\n</think>\n\nthe answer </thin"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 100])
def test_splitter_is_independent_of_piece_boundaries(size):
    pieces = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
    assert split(pieces) == ("\nsome <b>trace</b> 1 < 2\n", "the answer </thin")


def test_splitter_never_shows_a_tag_partly():
    s = ReasoningSplitter()
    assert s.feed("<th") == ("", "")
    assert s.feed("ink>a</th") == ("a", "")
    assert s.thinking
    assert s.feed("ink>") == ("", "")
    assert not s.thinking
    assert s.feed(" b") == ("", "b")


@pytest.mark.parametrize("text,want", [
    ("no trace at all", ("", "no trace at all")),
    ("<b>html</b> first", ("", "<b>html</b> first")),
    ("answer <think>late</think>", ("", "answer <think>late</think>")),  # only an opening tag counts
    ("<think>cut by max_tokens", ("cut by max_tokens", "")),              # unterminated: reasoning
    ("<thin", ("", "<thin")),                                             # ended inside a would-be tag
    ("", ("", "")),
])
def test_splitter_cases(text, want):
    assert split(list(text)) == want


def test_prompt_that_opens_the_trace():
    assert reasoning.prompt_opens_trace("<|assistant|><think>\n")
    assert split(["a</think>b"], started=True) == ("a", "b")
    assert not reasoning.prompt_opens_trace("<|assistant|>")


def test_budgets_and_formats_are_checked():
    assert reasoning.resolve_budget(None, None) is None
    assert reasoning.resolve_budget(5, "high") == 5  # an explicit budget wins
    assert reasoning.resolve_budget(None, "low") == reasoning.EFFORT_BUDGETS["low"]
    assert reasoning.EFFORT_BUDGETS["low"] < reasoning.EFFORT_BUDGETS["medium"] < reasoning.EFFORT_BUDGETS["high"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="reasoning_budget"):
            reasoning.resolve_budget(bad, None)
    with pytest.raises(ValueError, match="reasoning_effort"):
        reasoning.resolve_budget(None, "extreme")
    with pytest.raises(ValueError, match="reasoning_format"):
        reasoning.check_reasoning_format("raw")


# ---------------------------------------------------------------------------------------------
# the Python API


@pytest.fixture(scope="module")
def llm():
    with Llama(demo_model_path(), n_ctx=512, n_threads=1, verbose=False) as m:
        yield m


def chat(llm, **kw):
    return llm.create_chat_completion(QUESTION, temperature=0, max_tokens=100, **kw)


def streamed(llm, **kw) -> tuple[str, str, str, list[dict]]:
    chunks = list(chat(llm, stream=True, **kw))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert all(len(d) == 1 for d in deltas[1:-1])  # each delta carries one kind of text
    r = "".join(d.get("reasoning_content", "") for d in deltas)
    c = "".join(d.get("content", "") for d in deltas)
    return r, c, chunks[-1]["choices"][0]["finish_reason"], deltas


def test_chat_splits_the_trace_from_the_answer(llm):
    out = chat(llm)["choices"][0]
    assert out["message"] == {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}
    assert out["finish_reason"] == "stop"
    r, c, reason, deltas = streamed(llm)
    assert (r, c, reason) == (TRACE, ANSWER, "stop")
    # the trace streams first, then the answer; no tag text leaks into either
    kinds = [next(iter(d)) for d in deltas[1:-1]]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")


def test_reasoning_format_none_keeps_the_text(llm):
    out = chat(llm, reasoning_format="none")["choices"][0]["message"]
    assert out == {"role": "assistant", "content": f"<think>{TRACE}</think>{ANSWER}"}
    r, c, _, _ = streamed(llm, reasoning_format="none")
    assert (r, c) == ("", f"<think>{TRACE}</think>{ANSWER}")
    with pytest.raises(ValueError, match="reasoning_format"):
        chat(llm, reasoning_format="hidden")


def test_a_trace_cut_by_max_tokens_is_reasoning(llm):
    out = llm.create_chat_completion(QUESTION, temperature=0, max_tokens=10)["choices"][0]
    assert out["finish_reason"] == "length"
    assert out["message"]["content"] == ""
    assert TRACE.startswith(out["message"]["reasoning_content"]) and out["message"]["reasoning_content"]
    chunks = list(llm.create_chat_completion(QUESTION, temperature=0, max_tokens=10, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == out["message"]["reasoning_content"]
    assert not any("content" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_trace_in_the_history_is_not_rendered(llm):
    answered = {"role": "assistant", "content": ANSWER}
    follow = {"role": "user", "content": "What is 12 + 34?"}
    plain = llm.create_chat_completion(QUESTION + [answered, follow], temperature=0, max_tokens=60)
    with_trace = llm.create_chat_completion(
        QUESTION + [{**answered, "reasoning_content": TRACE}, follow], temperature=0, max_tokens=60)
    assert with_trace["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert with_trace["choices"][0]["message"] == plain["choices"][0]["message"]


def trace_token_pieces(llm) -> list[str]:
    """The text of each generated token of the trace (after the three tokens of <think>)."""
    out = chat(llm, logprobs=True)["choices"][0]
    pieces = [t["token"] for t in out["logprobs"]["content"]]
    assert "".join(pieces[:3]) == "<think>"
    return pieces[3:]


@pytest.mark.parametrize("budget", [0, 7, 40])
def test_reasoning_budget_forces_the_close_tag(llm, budget):
    pieces = trace_token_pieces(llm)
    out = chat(llm, reasoning_budget=budget)["choices"][0]
    assert out["message"]["reasoning_content"] == "".join(pieces[:budget])
    # what follows the forced </think> is the answer; the tiny demo model, never trained on a
    # cut trace, answers well only when little of the trace is missing
    assert out["message"]["content"] and out["finish_reason"] == "stop"
    if budget == 40:
        assert out["message"]["content"].startswith("The answer is ")
    r, c, _, _ = streamed(llm, reasoning_budget=budget)
    assert (r, c) == (out["message"]["reasoning_content"], out["message"]["content"])


def test_a_budget_longer_than_the_trace_changes_nothing(llm):
    assert chat(llm, reasoning_budget=1000)["choices"][0]["message"] == chat(llm)["choices"][0]["message"]


def test_reasoning_effort_maps_to_budgets(llm, monkeypatch):
    monkeypatch.setitem(reasoning.EFFORT_BUDGETS, "low", 7)
    want = chat(llm, reasoning_budget=7)["choices"][0]["message"]
    assert chat(llm, reasoning_effort="low")["choices"][0]["message"] == want
    assert chat(llm, reasoning_effort="low", reasoning_budget=1000)["choices"][0]["message"] == chat(llm)["choices"][0]["message"]
    with pytest.raises(ValueError, match="reasoning_effort"):
        chat(llm, reasoning_effort="extreme")


# ---------------------------------------------------------------------------------------------
# the server


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sambay.server.app import create_app
    from sambay.server.pool import SlotLlama, SlotPool

    def make(**app_kw):
        llm = SlotLlama(demo_model_path(), n_ctx=512, n_threads=1, verbose=False)
        return TestClient(create_app(SlotPool([llm], max_queue=4), model_alias="demo", **app_kw))

    return make


def post(c, **body):
    r = c.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, "max_tokens": 100, **body})
    return r


def sse(r) -> list[dict]:
    import json

    events = [e[len("data: "):] for e in r.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_server_reasoning_content(client):
    with client() as c:
        msg = post(c).json()["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}
        deltas = [e["choices"][0]["delta"] for e in sse(post(c, stream=True))]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == TRACE
        assert "".join(d.get("content", "") for d in deltas) == ANSWER
        assert post(c, reasoning_format="none").json()["choices"][0]["message"] == {
            "role": "assistant", "content": f"<think>{TRACE}</think>{ANSWER}"}
        cut = post(c, max_tokens=10).json()["choices"][0]
        assert cut["finish_reason"] == "length" and cut["message"]["content"] == ""
        assert TRACE.startswith(cut["message"]["reasoning_content"])
        # a reply sent back as history, trace included, is accepted and the trace not rendered
        follow = [*QUESTION, {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE},
                  {"role": "user", "content": "What is 12 + 34?"}]
        a = c.post("/v1/chat/completions", json={"messages": follow, "temperature": 0, "max_tokens": 60})
        follow[1] = {"role": "assistant", "content": ANSWER}
        b = c.post("/v1/chat/completions", json={"messages": follow, "temperature": 0, "max_tokens": 60})
        assert a.status_code == b.status_code == 200
        assert a.json()["choices"] == b.json()["choices"] and a.json()["usage"] == b.json()["usage"]
        for bad in ({"reasoning_format": "raw"}, {"reasoning_effort": "extreme"}, {"reasoning_budget": -1}):
            r = post(c, **bad)
            assert r.status_code == 422 and next(iter(bad)) in r.text, r.text


def test_server_default_format(client):
    with client(reasoning_format="none") as c:
        assert post(c).json()["choices"][0]["message"] == {
            "role": "assistant", "content": f"<think>{TRACE}</think>{ANSWER}"}
        # a request's own format wins over the server's
        msg = post(c, reasoning_format="deepseek").json()["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}


def test_server_budget(client, llm, monkeypatch):
    want = chat(llm, reasoning_budget=7)["choices"][0]["message"]
    monkeypatch.setitem(reasoning.EFFORT_BUDGETS, "low", 7)
    with client() as c:
        assert post(c, reasoning_budget=7).json()["choices"][0]["message"] == want
        assert post(c, reasoning_effort="low").json()["choices"][0]["message"] == want
    with client(reasoning_format="none", reasoning_budget=7) as c:
        assert post(c).json()["choices"][0]["message"]["content"] == (
            f"<think>{want['reasoning_content']}</think>{want['content']}")
        # a request's own settings win over the server's
        msg = post(c, reasoning_format="deepseek", reasoning_budget=1000).json()["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}


# ---------------------------------------------------------------------------------------------
# the CLI


def sambay(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sambay", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


RUN = ("run", "-p", "What is 457 - 286?", "--temp", "0", "-t", "1", "-q")


def test_cli_run_shows_or_hides_the_trace():
    assert sambay(*RUN).stdout == f"<think>{TRACE}</think>{ANSWER}\n"  # piped: the model's text
    assert sambay(*RUN, "--hide-thinking").stdout == f"{ANSWER}\n"


def test_cli_reasoning_budget():
    out = sambay(*RUN, "--reasoning-budget", "40")
    assert out.returncode == 0, out.stderr
    trace, answer = out.stdout.removeprefix("<think>").split("</think>")
    assert TRACE.startswith(trace) and len(trace) < len(TRACE)
    assert answer.startswith("The answer is ")


def test_cli_run_dims_the_trace_on_a_terminal():
    main, sub = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "sambay", *RUN], stdout=sub, stderr=subprocess.PIPE,
                              timeout=300)
        os.close(sub)
        sub = -1
        data = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        if sub >= 0:
            os.close(sub)
        os.close(main)
    assert proc.returncode == 0, proc.stderr
    text = data.decode().replace("\r\n", "\n")
    assert text == f"\x1b[2m{TRACE}\x1b[0m\n{ANSWER}\n"


def test_cli_chat_keeps_the_trace_out_of_the_history():
    turns = "What is 457 - 286?\nWhat is 12 + 34?\n"

    def second_prompt_tokens(*extra: str) -> int:
        out = sambay("chat", "--temp", "0", "-t", "1", "--verbose-speed", *extra, stdin=turns)
        assert out.returncode == 0, out.stderr
        reports = [line for line in out.stderr.splitlines() if line.startswith("[prompt: ")]
        assert len(reports) == 2, out.stderr
        return int(reports[1].split()[1])

    plain, kept = second_prompt_tokens(), second_prompt_tokens("--keep-thinking")
    n_trace = len(Llama(demo_model_path(), n_ctx=64, n_threads=1, verbose=False)
                  .tokenize(f"<think>{TRACE}</think>", special=True))
    assert kept - plain == n_trace
