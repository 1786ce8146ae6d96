"""`sambay serve` for operators: SSE keep-alive comments while a stream waits, Prometheus
`/metrics`, and every option from a `SAMBAY_*` environment variable. Servers run in-process
(test_server's helpers) over the session's tiny checkpoint."""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sambay import Llama  # noqa: E402
from sambay.engine import Model  # noqa: E402
from test_server import PROMPT, TIMEOUT, Server, serving  # noqa: E402

KEEP_ALIVE = ": keep-alive"


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return Model(tiny_gguf()[1])


def hold_evals(server: Server) -> threading.Event:
    """Every engine step of the server's contexts waits until the returned event is set (a
    held prefill: the slot stays busy and the first token does not come)."""
    gate = threading.Event()
    for llm in server.pool.llamas:
        def held(tokens: Any, _llm: Llama = llm) -> None:
            assert gate.wait(TIMEOUT)
            Llama.eval(_llm, tokens)
        llm.eval = held  # type: ignore[method-assign]
    return gate


def data_events(lines: list[str]) -> list[str]:
    """The ``data:`` payloads of SSE lines, after checking that everything else is a
    keep-alive comment or an event's blank line."""
    assert all(x.startswith("data: ") or x in ("", KEEP_ALIVE) for x in lines), lines
    return [x[len("data: "):] for x in lines if x.startswith("data: ")]


# ---------------------------------------------------------------------------------------------
# SSE keep-alive


def test_sse_keep_alive_while_prefilling_and_queued(model, tiny_gguf):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with Llama(tiny_gguf()[1], n_ctx=512, n_threads=1, verbose=False) as ref:
        expected = ref.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    with serving(model, parallel=1, keep_alive=0.05) as s:
        gate = hold_evals(s)
        url = s.url + "/v1/completions"
        try:
            with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as first:
                # the prefill is held: the headers and comments come before any token
                assert first.status_code == 200
                assert first.headers["content-type"].startswith("text/event-stream")
                lines1 = first.iter_lines()
                assert next(lines1) == KEEP_ALIVE
                assert s.health()["slots_processing"] == 1
                with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as second:
                    # the only slot is busy: this one waits in the queue, and hears from it
                    assert second.status_code == 200
                    lines2 = second.iter_lines()
                    assert next(lines2) == KEEP_ALIVE
                    h = s.health()
                    assert h["queue"] == 1 and h["slots_processing"] == 1, h
                    gate.set()
                    rest1, rest2 = list(lines1), list(lines2)
        finally:
            gate.set()
        for rest in (rest1, rest2):
            events = data_events(rest)
            assert events[-1] == "[DONE]"
            chunks = [httpx.Response(200, content=e).json() for e in events[:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks) == expected
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        # the OpenAI SDK reads a stream that began with comments (its headers came while held)
        gate = hold_evals(s)
        try:
            stream = s.client().completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0,
                                                   stream=True)
            gate.set()
            assert "".join(c.choices[0].text for c in stream) == expected
        finally:
            gate.set()


def test_sse_keep_alive_off_and_early_errors_keep_their_status(model):
    with serving(model, parallel=1, max_queue=0, keep_alive=0.05) as s:
        gate = hold_evals(s)
        body = {"prompt": PROMPT, "max_tokens": 2, "stream": True}
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=TIMEOUT) as first:
                assert next(first.iter_lines()) == KEEP_ALIVE
                # refused at once (no queue): an HTTP error, not a 200 stream
                r = httpx.post(s.url + "/v1/completions", json=body, timeout=TIMEOUT)
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
                gate.set()
        finally:
            gate.set()
        long_prompt = list(range(1, 600))  # beyond n_ctx 512: refused before any token
        r = httpx.post(s.url + "/v1/completions", json={**body, "prompt": long_prompt}, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with serving(model, parallel=1, keep_alive=0) as s:  # off: only data events
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=TIMEOUT)
        events = data_events(r.text.split("\n"))
        assert KEEP_ALIVE not in r.text and events[-1] == "[DONE]"


# ---------------------------------------------------------------------------------------------
# /metrics


def scrape(server: Server, **headers: str) -> dict[str, float]:
    """``/metrics`` as {'name{label="v",...}': value} (labels sorted), parsed by
    prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.url + "/metrics", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_count_requests_tokens_and_slots(model):
    pytest.importorskip("prometheus_client")
    key = {"Authorization": "Bearer k"}
    with serving(model, parallel=2, api_key="k", metrics=True, keep_alive=0.05) as s:
        assert httpx.get(s.url + "/metrics", timeout=TIMEOUT).status_code == 401  # behind the key
        client = s.client(api_key="k")
        n_prompt = len(s.pool.llamas[0].tokenize(PROMPT))
        out = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
        chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0,
                                                stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        bad = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "temperature": 9}, headers=key,
                         timeout=TIMEOUT)
        assert bad.status_code == 422
        assert httpx.get(s.url + "/no/such/path", headers=key, timeout=TIMEOUT).status_code == 404
        s.wait_for(lambda h: h["slots_idle"] == 2, "the slots to be free")
        m = scrape(s, **key)
        assert m['sambay_requests_total{endpoint="/v1/completions",status="200"}'] == 2
        assert m['sambay_requests_total{endpoint="/v1/completions",status="422"}'] == 1
        assert m['sambay_requests_total{endpoint="/metrics",status="401"}'] == 1
        assert m['sambay_requests_total{endpoint="other",status="404"}'] == 1
        assert m['sambay_request_duration_seconds_count{endpoint="/v1/completions"}'] == 3
        assert m['sambay_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] == 3
        assert m["sambay_tokens_predicted_total"] == 5 + 3
        # the second request may reuse the first one's prompt from its slot's cache
        assert m["sambay_prompt_tokens_total"] + m["sambay_prompt_tokens_cached_total"] == 2 * n_prompt
        assert m["sambay_prompt_tokens_total"] >= n_prompt
        assert m["sambay_tokens_predicted_seconds_total"] > 0 and m["sambay_prompt_seconds_total"] > 0
        assert m["sambay_predicted_tokens_seconds"] == pytest.approx(
            m["sambay_tokens_predicted_total"] / m["sambay_tokens_predicted_seconds_total"])
        assert (m["sambay_slots_total"], m["sambay_slots_idle"], m["sambay_requests_processing"],
                m["sambay_requests_deferred"]) == (2, 2, 0, 0)

        # two held streams take both slots; a third waits in the queue
        gate = hold_evals(s)
        body = {"prompt": PROMPT, "max_tokens": 2, "stream": True}
        streams = [httpx.stream("POST", s.url + "/v1/completions", json=body, headers=key, timeout=TIMEOUT)
                   for _ in range(3)]
        try:
            responses = [st.__enter__() for st in streams]  # each returns once its headers came
            s.wait_for(lambda h: h["queue"] == 1, "the third request to queue")
            m = scrape(s, **key)
            assert (m["sambay_slots_idle"], m["sambay_requests_processing"], m["sambay_requests_deferred"]) \
                == (0, 2, 1)
            gate.set()
            for r in responses:
                assert data_events(list(r.iter_lines()))[-1] == "[DONE]"
        finally:
            gate.set()
            for st in streams:
                st.__exit__(None, None, None)
        s.wait_for(lambda h: h["slots_idle"] == 2, "the slots to be free")
        assert scrape(s, **key)["sambay_tokens_predicted_total"] == 5 + 3 + 3 * 2


def test_metrics_off_by_default_answers_501(model):
    with serving(model) as s:
        r = httpx.get(s.url + "/metrics", timeout=TIMEOUT)
        assert r.status_code == 501 and "--metrics" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# SAMBAY_* environment variables


def serve_parser() -> Any:
    import argparse

    from sambay.server.settings import add_arguments

    p = argparse.ArgumentParser(prog="serve", allow_abbrev=False)
    add_arguments(p, ray=True)  # as `sambay serve`; reads os.environ: the test sets it with monkeypatch
    return p


def test_every_serve_option_has_an_environment_variable_shown_in_help(monkeypatch):
    from sambay.server.settings import ENV_VARS, env_var

    p = serve_parser()
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    missing = [a.option_strings for a in options if env_var(a) is None]
    assert not missing, f"add these serve options to settings.ENV_VARS: {missing}"
    assert sorted(env_var(a) for a in options) == sorted(ENV_VARS.values())  # no stale entries
    assert all(v.startswith("SAMBAY_") for v in ENV_VARS.values())
    text = " ".join(p.format_help().split())
    for var in ENV_VARS.values():
        assert f"(env: {var})" in text


def test_environment_variables_set_serve_options_and_the_command_line_wins(monkeypatch, capsys):
    from sambay.cli import build_parser
    from sambay.server import from_args

    env = {"SAMBAY_MODEL": "from-env.gguf", "SAMBAY_PORT": "9001", "SAMBAY_CTX_SIZE": "2048",
           "SAMBAY_PARALLEL": "3", "SAMBAY_CPU": "yes", "SAMBAY_METRICS": "1", "SAMBAY_API_KEY": "envkey",
           "SAMBAY_REASONING_FORMAT": "none", "SAMBAY_CORS_ORIGINS": "https://a.example, https://b.example",
           "SAMBAY_SSE_KEEP_ALIVE": "2.5", "SAMBAY_LOG_LEVEL": "debug", "SAMBAY_HOST": ""}  # empty: unset
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = from_args(build_parser().parse_args(["serve"]))  # -m is not needed: $SAMBAY_MODEL gives it
    assert (s.model, s.port, s.n_ctx, s.parallel, s.device, s.metrics, s.api_key) == \
        ("from-env.gguf", 9001, 2048, 3, "cpu", True, "envkey")
    assert (s.reasoning_format, s.keep_alive, s.log_level, s.host) == ("none", 2.5, "debug", "127.0.0.1")
    assert s.cors_origins == ("https://a.example", "https://b.example")
    s = from_args(build_parser().parse_args(["serve", "-m", "cli.gguf", "--port", "9002", "-c", "64",
                                             "--reasoning-format", "deepseek"]))
    assert (s.model, s.port, s.n_ctx, s.parallel, s.reasoning_format) == ("cli.gguf", 9002, 64, 3, "deepseek")
    monkeypatch.setenv("SAMBAY_METRICS", "off")
    assert from_args(build_parser().parse_args(["serve"])).metrics is False
    # the engine options and the chat template (the same definitions as run's)
    s = from_args(build_parser().parse_args(["serve"]))
    assert (s.flash_attn, s.type_k, s.type_v, s.use_mmap, s.chat_template) == (False, None, None, True, None)
    for k, v in {"SAMBAY_FLASH_ATTN": "on", "SAMBAY_CACHE_TYPE_K": "f32", "SAMBAY_CACHE_TYPE_V": "f32",
                 "SAMBAY_NO_MMAP": "1", "SAMBAY_CHAT_TEMPLATE": "chatml"}.items():
        monkeypatch.setenv(k, v)
    s = from_args(build_parser().parse_args(["serve"]))
    assert (s.flash_attn, s.type_k, s.type_v, s.use_mmap, s.chat_template) == (True, "f32", "f32", False, "chatml")
    s = from_args(build_parser().parse_args(["serve", "-fa", "off", "--chat-template", "phi3"]))
    assert (s.flash_attn, s.chat_template) == (False, "phi3")
    monkeypatch.setenv("SAMBAY_CHAT_TEMPLATE_FILE", "t.jinja")  # with $SAMBAY_CHAT_TEMPLATE: which one?
    with pytest.raises(ValueError, match="not both"):
        from_args(build_parser().parse_args(["serve"]))
    for var in ("SAMBAY_CHAT_TEMPLATE", "SAMBAY_CHAT_TEMPLATE_FILE", "SAMBAY_CACHE_TYPE_V"):
        monkeypatch.delenv(var)
    with pytest.raises(ValueError, match="type_k/type_v must be one of"):  # checked with the settings
        from_args(build_parser().parse_args(["serve", "-ctk", "q8_0"]))
    with pytest.raises(ValueError, match="unknown chat template name 'vicuna'"):
        from_args(build_parser().parse_args(["serve", "--chat-template", "vicuna"]))

    # a wrong value names its variable; the command line's errors stay argparse's own
    for var, value, expect in (("SAMBAY_PORT", "eighty", "$SAMBAY_PORT='eighty'"),
                               ("SAMBAY_FLASH_ATTN", "yes", "$SAMBAY_FLASH_ATTN='yes': choose from on"),
                               ("SAMBAY_CPU", "maybe", "$SAMBAY_CPU='maybe'"),
                               ("SAMBAY_LOG_LEVEL", "loud", "choose from critical")):
        monkeypatch.setenv(var, value)
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["serve"])
        assert exc.value.code == 2 and expect in capsys.readouterr().err
        monkeypatch.delenv(var)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "eighty"])
    assert "argument --port: invalid int value: 'eighty'" in capsys.readouterr().err
    # an unrelated command is not stopped by a bad serve variable
    monkeypatch.setenv("SAMBAY_PORT", "eighty")
    assert build_parser().parse_args(["run", "-p", "x"]).prompt == "x"
    monkeypatch.delenv("SAMBAY_MODEL")
    monkeypatch.delenv("SAMBAY_PORT")
    with pytest.raises(SystemExit):  # neither -m nor $SAMBAY_MODEL
        build_parser().parse_args(["serve"])
    assert "-m/--model" in capsys.readouterr().err


def test_metrics_without_prometheus_client_is_one_line(tiny_gguf):
    import subprocess
    import sys

    code = ("import sys; sys.modules['prometheus_client'] = None; from sambay.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "serve", "-m", str(tiny_gguf()[1]), "--metrics", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        'sambay serve: error: --metrics needs prometheus-client: pip install "sambay[server]"']


def test_engine_options_and_chat_template_reach_the_pool(tiny_gguf, tmp_path):
    """load_pool builds the slots with -fa/-ctk/-ctv/--no-mmap and the chat template; /props
    shows the template in use, and chat requests render with it."""
    from sambay.chat import BUILTIN_TEMPLATES
    from sambay.server import ServerSettings, load_pool
    from sambay.server.app import create_app

    path = tiny_gguf()[1]
    messages = [{"role": "user", "content": "Compute 12 + 34"}]
    default = load_pool(ServerSettings(model=str(path), n_ctx=64, n_threads=1, n_threads_batch=1))
    llm = default.llama
    assert (llm._ctx.flash_attn, llm._ctx._c.kv_type, llm.model.mmapped) == (False, "f16", True)
    assert llm.chat_template == llm.metadata["tokenizer.chat_template"]
    llm.close()
    settings = ServerSettings(model=str(path), n_ctx=64, n_threads=1, n_threads_batch=1, parallel=2,
                              flash_attn=True, type_k="f32", type_v="f32", use_mmap=False, chat_template="chatml")
    pool = load_pool(settings)
    assert all(llm.chat_template == BUILTIN_TEMPLATES["chatml"] for llm in pool.llamas)
    ctx = pool.llama._shared.ctx  # the one context of both slots
    assert (ctx.flash_attn, ctx._c.kv_type, pool.llama.model.mmapped) == (True, "f32", False)
    n_prompt = len(pool.llama.chat_prompt(messages)[1])
    assert pool.llama.chat_prompt(messages)[0].startswith("<|im_start|>user\n")
    server = Server(create_app(pool, model_alias="tiny"))
    try:
        props = httpx.get(server.url + "/props", timeout=TIMEOUT).json()
        assert props["chat_template"] == BUILTIN_TEMPLATES["chatml"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"messages": messages, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == n_prompt
    finally:
        server.stop()
