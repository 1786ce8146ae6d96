"""`sambay serve --ray`: two replicas of a tiny checkpoint on a local Ray cluster (started here,
loopback only, 2 CPUs), driven through the ingress by the official `openai` client and raw HTTP.
Skipped, saying so, where Ray Serve is not installed (the `ray` extra; left out of the test
extra on aarch64)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install \"sambay[ray]\"")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install \"sambay[ray]\"")

from sambay import Llama  # noqa: E402
from sambay.convert import convert, tiny  # noqa: E402
from sambay.ray_serve import APP_NAME, build_app, replica_stats  # noqa: E402
from sambay.server.app import create_app, make_server  # noqa: E402
from sambay.server.pool import SlotLlama, SlotPool  # noqa: E402

N_CTX = 2048    # long enough for a stream that is still running when its replica is killed
KEY = "secret"
TIMEOUT = 120.0
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}]
# the app's settings: 2 slots per replica, a queue of 4
SETTINGS: dict[str, Any] = dict(n_ctx=N_CTX, parallel=2, max_queue=4, n_threads=1, n_threads_batch=1, api_key=KEY,
                model_alias="tiny-model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    ck = tiny.write_checkpoint(root / "ck", "tiny-12", seed=0)
    return str(convert(ck, root / "m.gguf", outtype="f32", progress=False))


@pytest.fixture(scope="module")
def cluster(gguf_path) -> Iterator[str]:
    """The Ray app: 2 replicas of 2 slots each (queue of 4) behind the ingress; its base URL."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(gguf_path, replicas=2, **SETTINGS), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(gguf_path) -> Iterator[str]:
    """`sambay serve` on the same file (same settings) in this process; its base URL."""
    base = SlotLlama(gguf_path, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, n_seq_max=2, verbose=False)
    app = create_app(SlotPool.of_sequences(base, max_queue=4), model_alias="tiny-model", api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def ref(gguf_path) -> Iterator[Llama]:
    with Llama(gguf_path, n_ctx=N_CTX, n_threads=1, verbose=False) as llm:
        yield llm


def client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def owners() -> dict[str, str]:
    return serve.get_app_handle(APP_NAME).owners.remote().result(timeout_s=TIMEOUT)


def evaluated() -> dict[str, int]:
    return {rid: s["tokens_evaluated"] for rid, s in replica_stats().items()}


def wait_until(what: str, check: Any) -> None:
    """Polls ``check()`` until it is true; fails naming ``what`` after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {TIMEOUT:.0f} s"
        time.sleep(0.2)


def running_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments["SambayReplica"].replica_states.get("RUNNING", 0)


def continues_without_prefill(c: Any, ref: Any, user: str, history: list[dict[str, str]], on: str,
                              busy: str = "") -> None:
    """The next turn of ``user``'s conversation runs on replica ``on`` alone (other than
    ``busy``, which runs other work meanwhile), evaluates fewer tokens than its prompt (the
    history was not prefilled again) and gives the text and logprobs of a fresh evaluation of
    the whole history."""
    before = evaluated()
    got = c.chat.completions.create(model="x", messages=history, max_tokens=6, temperature=0, user=user,
                                    logprobs=True)
    after = evaluated()
    n_prompt = len(ref.chat_prompt(history)[1])
    grown = {rid: after[rid] - before.get(rid, 0) for rid in after if rid != busy}
    assert grown[on] == sum(grown.values()) and 0 < grown[on] < n_prompt, (grown, n_prompt)
    want = ref.create_chat_completion(history, max_tokens=6, temperature=0, logprobs=True)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    got_lp = [t.logprob for t in got.choices[0].logprobs.content]
    want_lp = [t["logprob"] for t in want["choices"][0]["logprobs"]["content"]]
    assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_same_answers_as_the_local_server(cluster, local):
    ray_c, local_c = client(cluster), client(local)
    for c in (ray_c, local_c):
        assert [m.id for m in c.models.list().data] == ["tiny-model"]
    chats = [c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=12, temperature=0)
             for c in (ray_c, local_c)]
    assert chats[0].choices[0].message.content == chats[1].choices[0].message.content
    assert chats[0].usage == chats[1].usage
    streamed = ["".join(ch.choices[0].text for ch in c.completions.create(
        model="x", prompt="Compute 12 + 34 =", max_tokens=12, temperature=0, stream=True) if ch.choices)
        for c in (ray_c, local_c)]
    assert streamed[0] == streamed[1] and streamed[0]
    # the same refusals, in the same shape: API key, limits, validation
    for url in (cluster, local):
        r = httpx.get(url + "/v1/models", timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    errors = []
    for url in (cluster, local):
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT,
                       json={"model": "x", "messages": MESSAGES, "max_tokens": N_CTX + 1})
        errors.append((r.status_code, r.json()))
    assert errors[0] == errors[1] and errors[0][0] == 400 and errors[0][1]["error"]["param"] == "max_tokens"


def _turns(c: Any, user: str) -> tuple[list[dict[str, str]], Any]:
    first = c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=6, temperature=0, user=user)
    history = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And 3+3?"}]
    return history, first


def test_second_turn_lands_on_the_replica_holding_the_conversation(cluster, ref):
    c = client(cluster)
    history, _ = _turns(c, "alice")
    holder = owners()["user:alice"]
    before = evaluated()
    second = c.chat.completions.create(model="x", messages=history, max_tokens=6, temperature=0, user="alice")
    after = evaluated()
    n_prompt = len(ref.chat_prompt(history)[1])
    assert second.usage.prompt_tokens == n_prompt
    assert owners()["user:alice"] == holder
    grown = {rid: after[rid] - before.get(rid, 0) for rid in after}
    assert sum(grown.values()) == grown[holder]  # only the holder worked
    # the history was not evaluated again: only the new tokens (and the decode steps)
    assert grown[holder] < n_prompt, (grown, n_prompt)


def test_moved_conversation_continues_identically(cluster, ref):
    c = client(cluster)
    history, _ = _turns(c, "bob")
    source = owners()["user:bob"]
    move = serve.get_app_handle(APP_NAME).move.remote("user:bob").result(timeout_s=TIMEOUT)
    assert move["from"] == source and move["to"] != source and move["tokens"] > 0
    assert owners()["user:bob"] == move["to"]
    continues_without_prefill(c, ref, "bob", history, on=move["to"])


def test_conversation_on_a_full_replica_moves_instead_of_prefilling_again(cluster, ref):
    c = client(cluster)
    history, _ = _turns(c, "erin")
    full = owners()["user:erin"]
    # two long streams sent to that replica (as the ingress sends work) take its 2 slots: the
    # second one overwrites erin's state, so the replica hands it over first
    # (the tiny model's random weights do not stop early: they run until cancelled)
    replicas = serve.get_deployment_handle("SambayReplica", APP_NAME)
    fillers = [replicas.options(stream=True).run.remote(
        lambda llm: llm.create_completion("Once", max_tokens=N_CTX - 16, temperature=0, stream=True),
        stream=True, spill=True, replica=full) for _ in range(2)]
    try:
        for f in fillers:
            assert next(iter(f))[1] == full  # STARTED there
        wait_until("moved off the full replica", lambda: owners()["user:erin"] != full)
        continues_without_prefill(c, ref, "erin", history, on=owners()["user:erin"], busy=full)
    finally:
        for f in fillers:
            f.cancel()


def test_32_streams_over_2_replicas_complete_or_get_503(cluster):
    def one(i: int) -> tuple[int, bool]:
        body = {"model": "x", "prompt": f"Count {i}:", "max_tokens": 24, "temperature": 0, "stream": True}
        with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.json()["error"]["code"] == "server_busy"
            lines = [line for line in r.iter_lines() if line]
            return 200, lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(ok for _, ok in results), results
    assert {status for status, _ in results} <= {200, 503}
    assert sum(status == 200 for status, _ in results) >= 4  # both replicas served


def test_removed_replica_hands_its_conversations_to_another(cluster, ref):
    c = client(cluster)
    history, _ = _turns(c, "carol")
    gone = owners()["user:carol"]
    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#SambayReplica#{gone}", namespace="serve")
    # removed as Serve's controller stops a replica on scale-down: its graceful shutdown (drain,
    # then the deployment's __del__), then the kill
    ray.get(actor.perform_graceful_shutdown.remote(), timeout=TIMEOUT)
    ray.kill(actor, no_restart=True)
    kept = owners()["user:carol"]
    assert kept != gone
    continues_without_prefill(c, ref, "carol", history, on=kept)
    wait_until("back to 2 replicas", lambda: running_replicas() == 2)  # Serve replaced the removed one


def test_killed_replica_ends_its_stream_and_the_next_requests_succeed(cluster):
    c = client(cluster)
    stream = c.completions.create(model="x", prompt="Once", max_tokens=N_CTX - 16, temperature=0, stream=True,
                                  user="victim")
    chunks = [next(iter(stream))]
    victim = owners()["user:victim"]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#SambayReplica#{victim}", namespace="serve"),
             no_restart=True)
    with pytest.raises(openai.APIError, match="replica"):
        for chunk in stream:
            chunks.append(chunk)
            assert chunk.choices[0].finish_reason is None, "the stream ended before its replica was killed"
    assert len(chunks) >= 1
    for i in range(4):  # the other replica (and the one Serve starts instead) answer
        r = c.completions.create(model="x", prompt=f"Then {i}", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length"


def test_cli_refuses_ray_options_without_ray_and_bad_autoscale(gguf_path, capsys):
    from sambay.cli import main
    from sambay.ray_serve import _parse_autoscale

    assert main(["serve", "-m", gguf_path, "--replicas", "2"]) != 0
    assert "--replicas only apply with --ray" in capsys.readouterr().err
    assert main(["serve", "-m", gguf_path, "--ray", "--replicas", "2", "--autoscale", "1:2"]) != 0
    assert "not both" in capsys.readouterr().err
    assert _parse_autoscale("1:3") == (1, 3)
    for bad in ("3:1", "0:2", "2", "a:b"):
        with pytest.raises(ValueError, match="MIN:MAX"):
            _parse_autoscale(bad)
