"""The model's own defaults: the GGUF's recommended sampling (``general.sampling.*``) is what the
API, the CLI and the server use when a call gives no value (an explicit argument always wins),
and ``n_ctx=0`` is the trained context."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine_helpers import rewrite_gguf
from sambay import Llama
from sambay.convert import convert, tiny
from sambay.engine import Context, Model
from sambay.sampling import SamplingParams

PROMPT = "Compute 12 + 34 = 46. Then"
MESSAGES = [{"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The converted tiny model (the model card's temp 0.6 / top_p 0.95), and a copy whose
    file asks for greedy sampling (temp 0) and a context of 8192."""
    root = tmp_path_factory.mktemp("defaults")
    ck = tiny.write_checkpoint(root / "ck", "tiny-8", seed=1)
    plain = convert(ck, root / "m.gguf", outtype="f32", progress=False)
    greedy = rewrite_gguf(plain, root / "greedy.gguf", set_kv={
        "general.sampling.temp": lambda v: 0.0, "phi4flash.context_length": lambda v: 8192})
    return plain, greedy


def texts(llm: Llama, **kw) -> set[str]:
    """The completions of PROMPT for three seeds."""
    return {llm(PROMPT, max_tokens=12, seed=s, **kw)["choices"][0]["text"] for s in (1, 2, 3)}


def test_llama_takes_the_files_sampling(files):
    plain, greedy = files
    with Llama(plain, n_ctx=128, n_threads=1, verbose=False) as llm:
        d = llm.sampling_defaults
        assert (d.temperature, d.top_p) == (pytest.approx(0.6), pytest.approx(0.95))
        assert d.top_k == SamplingParams().top_k  # not in the file: the library's default
    with Llama(greedy, n_ctx=128, n_threads=1, verbose=False) as llm:
        assert llm.sampling_defaults.temperature == 0.0
        want = llm(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
        assert texts(llm) == {want}  # every seed gives the greedy text
        assert len(texts(llm, temperature=1.5)) > 1  # an explicit argument wins
        chat = {llm.create_chat_completion(MESSAGES, max_tokens=8, seed=s)["choices"][0]["message"]["content"]
                for s in (1, 2, 3)}
        assert chat == {llm.create_chat_completion(MESSAGES, max_tokens=8, temperature=0)
                        ["choices"][0]["message"]["content"]}


def test_a_bad_recommended_setting_is_a_load_error(files, tmp_path):
    from sambay import LoadError

    plain, _ = files
    bad = rewrite_gguf(plain, tmp_path / "bad.gguf", set_kv={"general.sampling.top_p": lambda v: 5.0})
    with pytest.raises(LoadError, match="general.sampling.*top_p must be in"):
        Llama(bad, n_ctx=64, n_threads=1, verbose=False)


def test_n_ctx_0_is_the_trained_context(files):
    _, greedy = files
    m = Model(greedy)
    assert m.n_ctx_train == 8192
    assert Context(m, n_ctx=0, n_threads=1).n_ctx == 8192
    with Llama(greedy, n_ctx=0, n_threads=1, verbose=False) as llm:
        assert llm.n_ctx() == 8192


def sambay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sambay", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_run_and_info_use_the_files_sampling(files):
    plain, greedy = files
    out = sambay("info", "-m", str(greedy), "-c", "128")
    assert out.returncode == 0, out.stderr
    assert "sampling defaults: temperature 0.0 (file), top_k 40, top_p 0.95 (file)" in out.stdout
    base = ["run", "-m", str(greedy), "-p", PROMPT, "--raw", "-n", "12", "-c", "128", "-t", "1", "-q"]
    runs = {sambay(*base, "--seed", str(s)).stdout for s in (1, 2)}
    assert runs == {sambay(*base, "--temp", "0").stdout}
    assert len({sambay(*base, "--temp", "1.5", "--seed", str(s)).stdout for s in (1, 2, 3)}) > 1


def test_server_requests_default_to_the_files_sampling(files):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sambay.server.app import create_app
    from sambay.server.pool import SlotLlama, SlotPool

    _, greedy = files
    llm = SlotLlama(greedy, n_ctx=128, n_threads=1, verbose=False)
    with TestClient(create_app(SlotPool([llm], max_queue=4), model_alias="m")) as client:
        def ask(**kw) -> str:
            r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, **kw})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        assert {ask(seed=s) for s in (1, 2, 3)} == {ask(temperature=0)}
