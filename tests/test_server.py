"""`sambay serve`: the OpenAI-compatible server, driven by the official `openai` client and raw
HTTP. Servers run in-process on a free loopback port (uvicorn in a thread) over a converted
tiny checkpoint, and every test shuts its server down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from sambay import Llama  # noqa: E402
from sambay.convert import convert, tiny  # noqa: E402
from sambay.engine import Model  # noqa: E402
from sambay.server.app import create_app, make_server  # noqa: E402
from sambay.server.pool import SlotLlama, SlotPool  # noqa: E402

N_CTX = 512
PROMPT = "Compute 12 + 34 = 46. Then"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}]
TIMEOUT = 60.0  # generous: CI machines are slow and loaded


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    ck = tiny.write_checkpoint(root / "ck", "tiny-12", seed=0)
    return convert(ck, root / "m.gguf", outtype="f32", progress=False)


@pytest.fixture(scope="module")
def model(gguf_path):
    return Model(gguf_path)


@pytest.fixture(scope="module")
def ref(gguf_path):
    """The Python API on the same file, for same-text comparisons."""
    with Llama(gguf_path, n_ctx=N_CTX, n_threads=1, verbose=False) as llm:
        yield llm


class Server:
    """uvicorn serving an app on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.pool: SlotPool = app.state.pool
        self.server = make_server(app, log_level="warning", timeout_graceful_shutdown=5)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, **kw: Any) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"),
                             max_retries=0, timeout=TIMEOUT, **kw)

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()

    def wait_for(self, pred: Any, what: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if pred(h):
                return h
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {h}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.handle_exit(signal.SIGINT, None)  # what Ctrl-C does
        self.thread.join(timeout=TIMEOUT)
        assert not self.thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def serving(model: Model, *, parallel: int = 1, max_queue: int = 16, n_ctx: int = N_CTX,
            **app_kw: Any) -> Iterator[Server]:
    # what `sambay serve --parallel N` makes: one context of N sequences, a slot for each
    base = SlotLlama.from_model(model, n_ctx=n_ctx, n_threads=1, n_threads_batch=1, n_seq_max=parallel,
                                verbose=False)
    server = Server(create_app(SlotPool.of_sequences(base, max_queue=max_queue), model_alias="tiny-model",
                               **app_kw))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def srv(model):
    with serving(model, parallel=2, max_tokens=400) as s:
        yield s


def slow_down(server: Server, seconds: float) -> None:
    """Make every engine step of the server's contexts take at least ``seconds``."""
    for llm in server.pool.llamas:
        def slow(tokens: Any, _llm: Llama = llm) -> None:
            time.sleep(seconds)
            Llama.eval(_llm, tokens)
        llm.eval = slow  # type: ignore[method-assign]


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n"), body[-200:]
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


# ---------------------------------------------------------------------------------------------
# the openai client gets what the Python API gives


def test_openai_completions_match_the_python_api(srv, ref):
    client = srv.client()
    texts = {}
    for seed in (5, 6):
        want = ref(PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=seed)
        got = client.completions.create(model="/some/other/file.gguf", prompt=PROMPT, max_tokens=12,
                                        temperature=0.9, top_p=0.9, seed=seed)
        assert got.object == "text_completion" and got.model == "tiny-model"  # the file is fixed
        assert got.choices[0].text == want["choices"][0]["text"]
        assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
        assert got.usage.model_dump(exclude_none=True) == want["usage"]
        chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0.9,
                                                top_p=0.9, seed=seed, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want["choices"][0]["text"]
        assert chunks[-1].choices[0].finish_reason == want["choices"][0]["finish_reason"]
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert chunks[-1].usage.model_dump(exclude_none=True) == want["usage"]
        texts[seed] = got.choices[0].text
    assert texts[5] != texts[6]  # the seed reaches the sampler
    # token-id prompts, stop strings and logprobs
    ids = ref.tokenize(PROMPT)
    greedy = client.completions.create(model="m", prompt=ids, max_tokens=16, temperature=0, logprobs=2)
    text = greedy.choices[0].text
    assert text == ref(ids, max_tokens=16, temperature=0)["choices"][0]["text"] and len(text) >= 6
    lp = greedy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == greedy.usage.completion_tokens
    assert all(v <= 0 and abs(max(top.values()) - v) < 1e-5 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    stop = text[3:6]
    cut = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_openai_chat_matches_the_python_api(srv, ref):
    client = srv.client()
    want = ref.create_chat_completion(MESSAGES, max_tokens=10, temperature=0.7, seed=3)
    got = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, temperature=0.7, seed=3)
    assert got.object == "chat.completion" and got.model == "tiny-model"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.model_dump(exclude_none=True) == want["usage"]
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=10,
                                                 temperature=0.7, seed=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == want["choices"][0]["message"]["content"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == want["usage"]
    # logprobs, and content given as text parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]}]
    got = client.chat.completions.create(model="m", messages=parts, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2)
    want = ref.create_chat_completion([{"role": "user", "content": "2+2?"}], max_tokens=4, temperature=0,
                                      logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    lps = got.choices[0].logprobs.content
    assert [x.logprob for x in lps] == pytest.approx(
        [x["logprob"] for x in want["choices"][0]["logprobs"]["content"]], abs=1e-5)
    assert all(len(x.top_logprobs) == 2 for x in lps)


# ---------------------------------------------------------------------------------------------
# HTTP details


def test_sse_framing(srv):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "usage" not in chunks[0]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps(body), timeout=TIMEOUT)  # no content type
    events = sse_events(r.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    # with include_usage the usage comes once, in the last chunk
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_invalid_requests_get_openai_errors_never_500(srv):
    post = lambda path, **kw: httpx.post(srv.url + path, timeout=TIMEOUT, **kw)  # noqa: E731
    err = _error(post("/v1/completions", json={"prompt": "x", "max_tokenz": 3}), 422)
    assert err["code"] == "unknown_parameter" and "max_tokenz" in err["message"]
    err = _error(post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": "hot"}), 422)
    assert err["param"] == "temperature"
    for bad in ({"prompt": "x", "temperature": 3}, {"prompt": "x", "n": 2}, {"prompt": "x", "logprobs": -1},
                {"prompt": "x", "stop": [""]}, {"prompt": ["a", "b"]}, {}, [1, 2],
                {"prompt": "x", "logit_bias": {"5": 101.0}}, {"prompt": "x", "logit_bias": {"a": 1.0}}):
        _error(post("/v1/completions", json=bad), 422)
    for bad in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        _error(post("/v1/chat/completions", json=bad), 422)
    assert _error(post("/v1/completions", content=b"{not json"), 400)["code"] == "invalid_json"
    deep = b"[" * 100_000 + b"]" * 100_000  # the decoder's recursion limit, not a 500
    assert _error(post("/v1/completions", content=deep), 400)["code"] == "invalid_json"
    assert _error(post("/v1/completions", content=b'{"prompt": ' + deep + b"}"), 400)["code"] == "invalid_json"
    assert _error(post("/v1/completions", json={"prompt": "x", "max_tokens": 401}), 400)["param"] == "max_tokens"
    _error(post("/v1/completions", json={"prompt": [1, 10**6]}), 400)  # token id outside the vocabulary
    _error(post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1}), 400)
    _error(post("/v1/completions", json={"prompt": ""}), 400)
    for stream in (False, True):  # a prompt longer than the context: 400 even when streaming
        err = _error(post("/v1/completions", json={"prompt": [5] * (N_CTX + 10), "stream": stream}), 400)
        assert err["code"] == "context_length_exceeded"
    _error(post("/v1/completions", content=b"x" * (5 * 2**20)), 413)
    assert _error(httpx.get(srv.url + "/v1/nothing", timeout=TIMEOUT), 404)["code"] == "not_found"
    _error(httpx.get(srv.url + "/v1/completions", timeout=TIMEOUT), 405)
    # the openai client maps them to its exception types
    client = srv.client()
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="m", prompt="x", n=3)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b " * 400}])
    assert info.value.code == "context_length_exceeded"
    assert srv.health()["status"] == "ok"


def test_models_health_tokenize(srv, ref):
    models = srv.client().models.list()
    assert [m.id for m in models.data] == ["tiny-model"] and models.data[0].owned_by == "sambay"
    assert srv.health() == {"status": "ok", "slots_idle": 2, "slots_processing": 0, "queue": 0, "queue_limit": 16}
    r = httpx.post(srv.url + "/tokenize", json={"content": PROMPT}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"tokens": ref.tokenize(PROMPT)}
    r = httpx.post(srv.url + "/tokenize", json={"content": "a<|end|>", "with_pieces": True}, timeout=TIMEOUT)
    assert [p["piece"] for p in r.json()["tokens"]][-1] == "<|end|>"
    r = httpx.post(srv.url + "/detokenize", json={"tokens": ref.tokenize(PROMPT)}, timeout=TIMEOUT)
    assert r.json() == {"content": PROMPT}
    _error(httpx.post(srv.url + "/detokenize", json={"tokens": [1, -1]}, timeout=TIMEOUT), 400)


def test_api_key(model):
    with serving(model, api_key="s3cret") as s:
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/props", None),
                                   ("POST", "/v1/completions", {"prompt": "x"}), ("GET", "/nothing", None)):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}):
                r = httpx.request(method, s.url + path, json=body, headers=headers, timeout=TIMEOUT)
                assert _error(r, 401)["code"] == "invalid_api_key"
        # /health is a liveness probe: no key needed
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200
        # the scheme in any case (RFC 7235)
        for scheme in ("Bearer", "bearer", "BEARER"):
            ok = httpx.get(s.url + "/v1/models", headers={"Authorization": f"{scheme} s3cret"}, timeout=TIMEOUT)
            assert ok.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        out = s.client(api_key="s3cret").completions.create(model="m", prompt=PROMPT, max_tokens=2)
        assert out.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------
# concurrency: the queue, disconnects, load


def test_full_queue_answers_503(model):
    with serving(model, parallel=1, max_queue=1) as s:
        slow_down(s, 0.05)  # the first request would run for 15 s: it is cut short below
        body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0}
        first = httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT)
        r1 = first.__enter__()
        try:
            assert r1.status_code == 200
            s.wait_for(lambda h: h["slots_processing"] == 1, "the first request to run")
            queued: dict[str, Any] = {}
            t = threading.Thread(target=lambda: queued.update(
                r=httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=TIMEOUT)))
            t.start()
            s.wait_for(lambda h: h["queue"] == 1, "the second request to queue")
            r3 = httpx.post(s.url + "/v1/completions", json=body, timeout=TIMEOUT)
            err = _error(r3, 503)
            assert err["code"] == "server_busy" and "busy" in err["message"] and r3.headers["retry-after"]
            with pytest.raises(openai.InternalServerError) as exc:
                s.client().completions.create(model="m", prompt="x")
            assert exc.value.status_code == 503
            assert s.pool.n_rejected == 2
        finally:
            first.__exit__(None, None, None)  # the client goes away: the queued request runs
        t.join(timeout=TIMEOUT)
        assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 3
        s.wait_for(lambda h: h["slots_idle"] == 1 and h["queue"] == 0, "the server to be idle")


def test_client_disconnect_stops_generation(model):
    with serving(model, parallel=1) as s:
        slow_down(s, 0.02)  # 300 tokens would take >= 6 s
        body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True}
        before = s.pool.tokens_evaluated
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 5:
                    break
            at_close = s.pool.tokens_evaluated
        t0 = time.monotonic()
        s.wait_for(lambda h: h["slots_idle"] == 1, "the generation to stop", timeout=10)
        stopped_after = time.monotonic() - t0
        settled = s.pool.tokens_evaluated
        time.sleep(0.5)
        assert s.pool.tokens_evaluated == settled  # no decode steps after the stop
        n_prompt = len(s.pool.llamas[0].tokenize(PROMPT))
        assert settled - before < n_prompt + 60  # far from the 300 it would have decoded
        assert settled - at_close <= 25, (at_close, settled)  # ~0.5 s of slack on a loaded machine
        assert s.pool.n_cancelled == 1, stopped_after
        # a non-streaming request whose client gives up is cancelled as well
        before = s.pool.tokens_evaluated
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(TIMEOUT, read=0.5))
        s.wait_for(lambda h: h["slots_idle"] == 1, "the generation to stop", timeout=10)
        assert s.pool.tokens_evaluated - before < n_prompt + 80
        assert s.pool.n_cancelled == 2


def test_stopping_a_job_reaches_the_engine(model):
    # the stop request is passed to Llama.cancel(): an eval that starts after it (like one
    # running when it comes, e.g. a long prefill) is stopped by the engine, not run to its end
    llm = SlotLlama.from_model(model, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)
    assert not isinstance(llm.cancel, threading.Event)  # the engine's cancel, not shadowed
    pool = SlotPool([llm], max_queue=1)  # a job's slot returns just after its result
    stop_sent = threading.Event()
    ids = llm.tokenize(PROMPT)

    def prefill_after_stop(slot: SlotLlama) -> str:
        assert stop_sent.wait(TIMEOUT)
        slot.eval(ids)
        return "evaluated"

    def prefill(slot: SlotLlama) -> list[int]:
        slot.reset()
        slot.eval(ids)
        return slot.input_ids

    async def main() -> list[Any]:
        job = pool.start(await pool.acquire(), prefill_after_stop, stream=False)
        job.cancel()
        stop_sent.set()
        out = [await job.result()]
        for _ in range(2):  # the slot's next jobs are not stopped by the old request
            out.append(await pool.start(await pool.acquire(), prefill, stream=False).result())
        return out

    try:
        stopped, *later = asyncio.run(main())
    finally:
        pool.close()
    assert stopped is None and pool.n_cancelled == 1
    assert later == [ids, ids]


def test_shutdown_ends_running_and_queued_requests_promptly(model):
    with serving(model, parallel=1, max_queue=4) as s:
        slow_down(s, 0.05)  # 300 tokens: 15 s
        body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0}
        out: dict[str, Any] = {}

        def stream() -> None:
            with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
                out["stream"] = (r.status_code, r.read().decode())

        threads = [threading.Thread(target=stream),
                   threading.Thread(target=lambda: out.update(queued=httpx.post(s.url + "/v1/completions", json=body,
                                                                                timeout=TIMEOUT)))]
        threads[0].start()
        s.wait_for(lambda h: h["slots_processing"] == 1, "the stream to run")
        threads[1].start()
        s.wait_for(lambda h: h["queue"] == 1, "the second request to queue")
        t0 = time.monotonic()
        s.stop()
        stop_seconds = time.monotonic() - t0
        for t in threads:
            t.join(timeout=TIMEOUT)
    assert stop_seconds < 4, stop_seconds  # not uvicorn's 5 s graceful timeout
    status, text = out["stream"]
    if status == 200:  # stopped after its first token: the error ends the event stream
        assert json.loads(sse_events(text)[-1])["error"]["code"] == "shutting_down"
    else:  # stopped in the prefill (the engine's cancel): an HTTP error, as for the queued one
        assert status == 503 and json.loads(text)["error"]["code"] == "shutting_down"
    assert _error(out["queued"], 503)["code"] == "shutting_down"


def test_load_32_concurrent_streams(model):
    n_requests = 32
    with serving(model, parallel=2, max_queue=8, n_ctx=256) as s:

        async def one(client: Any, i: int) -> tuple[str, float]:
            body = {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 16,
                    "temperature": 0.8, "seed": i, "stream": True}
            t0 = time.monotonic()
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                text = (await r.aread()).decode()
            if r.status_code == 503:
                assert json.loads(text)["error"]["code"] == "server_busy"
                return "busy", time.monotonic() - t0
            assert r.status_code == 200, text
            events = sse_events(text)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
            return "ok", time.monotonic() - t0

        async def main() -> list[tuple[str, float]]:
            limits = httpx.Limits(max_connections=n_requests + 1)
            async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT, limits=limits) as client:
                return await asyncio.wait_for(
                    asyncio.gather(*(one(client, i) for i in range(n_requests))), timeout=120)

        t0 = time.monotonic()
        results = asyncio.run(main())
        wall = time.monotonic() - t0
        ok = [t for kind, t in results if kind == "ok"]
        busy = [t for kind, t in results if kind == "busy"]
        print(f"\nload: {len(ok)} completed, {len(busy)} got 503, {wall:.2f} s wall, "
              f"slowest completed {max(ok):.2f} s")
        assert len(ok) + len(busy) == n_requests
        assert len(ok) >= 2 + 8  # a request is refused only when 2 run and 8 wait
        assert s.pool.n_rejected == len(busy)
        assert s.health() == {"status": "ok", "slots_idle": 2, "slots_processing": 0, "queue": 0, "queue_limit": 8}
        assert s.client().completions.create(model="m", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_eight_streams_at_once_each_get_their_text_alone(model, ref):
    prompts = [f"Compute {a} + {b} =" for a, b in ((12, 34), (5, 7), (100, 23), (9, 9), (41, 1), (3, 30),
                                                   (77, 8), (60, 6))]
    want = [ref.create_completion(p, max_tokens=24, temperature=0)["choices"][0]["text"] for p in prompts]
    with serving(model, parallel=8) as s:
        shared = s.pool.llamas[0]._shared
        steps0, rows0 = shared.steps, shared.rows

        async def one(client: Any, prompt: str) -> str:
            body = {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                text = (await r.aread()).decode()
            assert r.status_code == 200, text
            events = sse_events(text)
            assert events[-1] == "[DONE]"
            return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])

        async def main() -> list[str]:
            async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout=120)

        got = asyncio.run(main())
        assert got == want
        # they were decoded together: several sequences per engine step on average
        steps, rows = shared.steps - steps0, shared.rows - rows0
        assert rows / steps > 2, f"{rows} sequence entries in {steps} steps"
        # and through the official client, while the others are idle
        assert s.client().completions.create(model="m", prompt=prompts[0], max_tokens=24,
                                             temperature=0).choices[0].text == want[0]


def test_next_turn_lands_on_the_slot_holding_the_conversation(model, ref):
    with serving(model, parallel=4) as s:
        client = s.client()
        first = [{"role": "user", "content": "Compute 12 + 34."}]
        r1 = client.chat.completions.create(model="m", messages=first, max_tokens=12, temperature=0)
        # other requests in between use other slots' state
        for q in ("x", "y"):
            client.completions.create(model="m", prompt=q, max_tokens=2, temperature=0)
        second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                          {"role": "user", "content": "And 5 + 6?"}]
        n_prompt = len(ref.chat_prompt(second)[1])
        before = s.pool.tokens_evaluated
        r2 = client.chat.completions.create(model="m", messages=second, max_tokens=4, temperature=0)
        evaluated = s.pool.tokens_evaluated - before
        assert r2.usage.prompt_tokens == n_prompt
        # the first turn's prompt is not evaluated again (only the rest, and the decode steps)
        n_first = len(ref.chat_prompt(first)[1])
        assert evaluated <= n_prompt - n_first + 4, (evaluated, n_prompt, n_first)


# ---------------------------------------------------------------------------------------------
# the command line


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sambay_serve_command(gguf_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sambay", "serve", "-m", str(gguf_path), "--port", str(port), "-c", "128",
         "--parallel", "2", "--api-key", "k", "--log-level", "warning", "-t", "1"],
        stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("OpenAI API at" in x for x in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert "weights" in lines[0] and "2 sequence(s) x n_ctx 128" in lines[0] and "compute" in lines[0]
        assert f"http://127.0.0.1:{port}/v1 (API key required, 2 slot(s)" in lines[1]
        headers = {"Authorization": "Bearer k"}
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", headers=headers, timeout=TIMEOUT)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert r.json()["slots_idle"] == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=TIMEOUT)
        assert client.models.list().data[0].id == os.path.basename(gguf_path)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert proc.returncode == 0


def test_serve_options_and_errors(tmp_path, gguf_path):
    from sambay.cli import build_parser
    from sambay.server import from_args

    settings = from_args(build_parser().parse_args(["serve", "-m", "x.gguf"]))
    assert (settings.host, settings.port, settings.parallel, settings.api_key) == ("127.0.0.1", 8000, 1, None)
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run("-m", "sambay.server", "--help")
    assert out.returncode == 0 and "--parallel" in out.stdout and "--api-key" in out.stdout
    out = run("-m", "sambay", "serve", "-m", str(tmp_path / "none.gguf"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"sambay serve: error: model file not found: {tmp_path / 'none.gguf'}"]
    with socket.socket() as busy:  # a busy port: one line, and no address announced before
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("-m", "sambay", "serve", "-m", str(gguf_path), "--port", str(port))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"sambay serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    out = run("-m", "sambay", "serve", "-m", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"sambay serve: error: {tmp_path}: is a folder; give the path of a .gguf file"]
    out = run("-m", "sambay", "serve", "-m", "x.gguf", "--parallel", "0")
    assert out.returncode == 1 and "parallel must be an integer >= 1" in out.stderr
    # without the server extra: one line naming the install command
    code = "import sys; sys.modules['fastapi'] = None; from sambay.cli import main; sys.exit(main(sys.argv[1:]))"
    out = run("-c", code, "serve", "-m", str(tmp_path / "none.gguf"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        'sambay serve: error: the server needs FastAPI and uvicorn (missing: fastapi): pip install "sambay[server]"']


# ------------------------------------------------------------------------------ structured output

STRICT_ARRAY = {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
NUMBERS = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "tags": STRICT_ARRAY},
           "required": ["n", "tags"], "additionalProperties": False}


def test_openai_sdk_parse_with_a_pydantic_model(srv):
    pytest.importorskip("llguidance")
    from pydantic import BaseModel, Field
    from typing import Literal

    class Inner(BaseModel):
        ok: bool
        tags: list[Literal["a", "b"]] = Field(max_length=2)

    class Reply(BaseModel):
        op: Literal["add", "sub"]
        n: int = Field(ge=0, le=99)
        inner: Inner

    client = srv.client()
    for seed in range(3):
        # a budget of 0: a random model that opens a trace would rarely close it
        out = client.chat.completions.parse(model="m", messages=MESSAGES, response_format=Reply, seed=seed,
                                            temperature=1.0, max_tokens=200, extra_body={"reasoning_budget": 0})
        reply = out.choices[0].message.parsed
        assert isinstance(reply, Reply) and 0 <= reply.n <= 99, out.choices[0].message.content


def test_json_schema_grammar_and_json_object_fields(srv):
    pytest.importorskip("llguidance")
    client = srv.client()
    for seed in range(2):
        text = client.completions.create(model="m", prompt="JSON:", max_tokens=200, seed=seed, temperature=1.0,
                                         extra_body={"json_schema": NUMBERS}).choices[0].text
        value = json.loads(text)
        assert set(value) == {"n", "tags"} and 0 <= value["n"] <= 99 and set(value["tags"]) <= {"a", "b"}
        text = client.completions.create(model="m", prompt="?", max_tokens=20, seed=seed, temperature=1.0,
                                         extra_body={"grammar": 'root ::= "yes" | "no"'}).choices[0].text
        assert text in ("yes", "no")
    out = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=300, seed=0,
                                         response_format={"type": "json_object"},
                                         extra_body={"reasoning_budget": 0})
    assert out.choices[0].finish_reason == "length" or isinstance(json.loads(out.choices[0].message.content), dict)


def test_invalid_schemas_and_grammars_are_400(srv):
    pytest.importorskip("llguidance")
    post = lambda path, **kw: httpx.post(srv.url + path, timeout=TIMEOUT, **kw)  # noqa: E731
    for stream in (False, True):
        err = _error(post("/v1/chat/completions", json={
            "messages": MESSAGES, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}}), 400)
        assert err["code"] == "invalid_grammar" and "frob" in err["message"] and err["param"] == "response_format"
    err = _error(post("/v1/completions", json={"prompt": "x", "grammar": "root ::= nothing"}), 400)
    assert "nothing" in err["message"] and err["param"] == "grammar"
    _error(post("/v1/completions", json={"prompt": "x", "response_format": {"type": "yaml"}}), 400)
    _error(post("/v1/completions", json={"prompt": "x", "grammar": 'root ::= "a"', "json_schema": {}}), 400)
    # wrong types stay 422
    _error(post("/v1/completions", json={"prompt": "x", "response_format": "json"}), 422)
    _error(post("/v1/completions", json={"prompt": "x", "grammar": 5}), 422)
    assert srv.health()["status"] == "ok"


# ------------------------------------------------------------------------------ what real clients send


def test_known_openai_and_llama_cpp_fields_are_accepted(srv, ref, caplog):
    post = lambda path, **kw: httpx.post(srv.url + path, timeout=TIMEOUT, **kw)  # noqa: E731
    extras = {"store": False, "metadata": {"k": "v"}, "service_tier": "auto", "cache_prompt": True,
              "n_keep": 0, "id_slot": -1, "typical_p": 1.0, "mirostat": 0, "samplers": ["top_k"],
              "timings_per_token": False, "prompt_cache_key": "x"}
    want = ref.create_chat_completion(MESSAGES, max_tokens=6, temperature=0)["choices"][0]["message"]
    messages = [{**m, "annotations": [], "id": "msg_1"} for m in MESSAGES]  # extra keys on messages
    with caplog.at_level("INFO", logger="sambay.server"):
        for _ in range(2):
            r = post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                                   "reasoning_effort": "low", "chat_template_kwargs": {},
                                                   "modalities": ["text"], **extras})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want["content"]
    assert sum("'n_keep'" in m for m in caplog.messages) <= 1  # logged once at most
    r = post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, **extras})
    assert r.status_code == 200, r.text
    # the OpenAI SDK's own extras
    srv.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, store=False,
                                         metadata={"a": "b"}, service_tier="auto")


def test_llama_cpp_fields_with_a_meaning_here_are_mapped(srv, ref):
    post = lambda path, **kw: httpx.post(srv.url + path, timeout=TIMEOUT, **kw)  # noqa: E731
    # n_probs -> logprobs
    r = post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "n_probs": 2}).json()
    assert all(len(t) == 2 for t in r["choices"][0]["logprobs"]["top_logprobs"])
    r = post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0,
                                           "n_probs": 2}).json()
    assert all(len(t["top_logprobs"]) == 2 for t in r["choices"][0]["logprobs"]["content"])
    # logit_bias (OpenAI's): token ids as strings
    x = ref.tokenize(" x")[-1]
    want = ref.create_completion(PROMPT, max_tokens=4, temperature=0, logit_bias={x: 100.0})["choices"][0]["text"]
    got = srv.client().completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0,
                                          logit_bias={str(x): 100}).choices[0].text
    assert got == want == ref.tokenizer.token_bytes(x).decode() * 4
    _error(post("/v1/completions", json={"prompt": "x", "logit_bias": {"99999999": 1}}), 400)
    # typical_p and mirostat: the same text as the Python API
    for api, http in (({"typical_p": 0.3}, {"typical_p": 0.3}),
                      ({"mirostat_mode": 2, "mirostat_tau": 3.0}, {"mirostat": 2, "mirostat_tau": 3.0})):
        want = ref.create_completion(PROMPT, max_tokens=8, temperature=0.9, seed=5, **api)["choices"][0]["text"]
        got = post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 5,
                                            **http}).json()["choices"][0]["text"]
        assert got == want
    # repeat_last_n -> the penalties' window
    for n in (1, 64):
        want = ref.create_completion(PROMPT, max_tokens=12, temperature=0, repeat_penalty=1.5,
                                     penalty_last_n=n)["choices"][0]["text"]
        got = post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                            "repeat_penalty": 1.5, "repeat_last_n": n}).json()
        assert got["choices"][0]["text"] == want


def test_wrong_types_and_unsupported_values_stay_422(srv):
    post = lambda path, **kw: httpx.post(srv.url + path, timeout=TIMEOUT, **kw)  # noqa: E731
    for bad in ({"store": [1]}, {"metadata": "x"}, {"typical_p": 1.5}, {"mirostat": 3}, {"tfs_z": 0.5}, {"n_probs": -1},
                {"repeat_last_n": -2}, {"cache_prompt": "maybe"}, {"ignore_eos": True}):
        err = _error(post("/v1/completions", json={"prompt": "x", **bad}), 422)
        assert err["param"] == next(iter(bad)) or next(iter(bad)) in err["message"], err
    _error(post("/v1/chat/completions", json={"messages": MESSAGES, "chat_template_kwargs": {"messages": 1}}), 400)
    _error(post("/v1/chat/completions", json={"messages": MESSAGES, "chat_template_kwargs": []}), 422)


def test_cors_and_props(model):
    with serving(model, api_key="k", cors_origins=["https://app.example"]) as s:
        pre = httpx.options(s.url + "/v1/chat/completions", timeout=TIMEOUT, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(s.url + "/v1/models", timeout=TIMEOUT,
                      headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        props = httpx.get(s.url + "/props", headers={"Authorization": "Bearer k"}, timeout=TIMEOUT).json()
        llm = s.pool.llamas[0]
        assert props["n_ctx"] == props["default_generation_settings"]["n_ctx"] == llm.n_ctx()
        assert props["chat_template"] == llm.metadata["tokenizer.chat_template"]
        assert props["default_generation_settings"]["params"]["temperature"] == llm.sampling_defaults.temperature
        assert props["total_slots"] == 1
    with serving(model) as s:  # no --cors-origins: no CORS headers, preflight refused
        pre = httpx.options(s.url + "/v1/chat/completions", timeout=TIMEOUT, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
