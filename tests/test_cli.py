"""The `sambay` CLI end to end, through subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sambay import Llama
from sambay.convert import convert, tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ck = tiny.write_checkpoint(root / "ck", "tiny-8", seed=1)
    return convert(ck, root / "m.gguf", outtype="f32", progress=False)


def sambay(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sambay", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_run_streams_the_same_text_as_the_api(model):
    out = sambay("run", "-m", str(model), "-p", "Compute 12 + 34", "-n", "12", "--temp", "0",
                 "-c", "128", "-t", "1")
    assert out.returncode == 0, out.stderr
    with Llama(model, n_ctx=128, verbose=False) as llm:
        want = llm.create_chat_completion([{"role": "user", "content": "Compute 12 + 34"}],
                                          max_tokens=12, temperature=0)
    assert out.stdout == want["choices"][0]["message"]["content"] + "\n"
    assert "tok/s" in out.stderr and "device: CPU" in out.stderr


def test_run_raw_and_from_file(model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Then 46 * 3 =")
    out = sambay("run", "-m", str(model), "-f", str(prompt), "--raw", "-n", "8", "--temp", "0",
                 "-c", "64", "-q")
    assert out.returncode == 0, out.stderr
    with Llama(model, n_ctx=64, verbose=False) as llm:
        want = llm("Then 46 * 3 =", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert out.stdout == want + "\n"
    assert out.stderr == ""


def test_chat_over_piped_stdin_keeps_history(model):
    out = sambay("chat", "-m", str(model), "-n", "6", "--temp", "0", "-c", "256",
                 stdin="hello\nwhat is 2+2?\n/exit\nnot read\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split("\n")[:2]
    with Llama(model, n_ctx=256, verbose=False) as llm:
        h = [{"role": "user", "content": "hello"}]
        r1 = llm.create_chat_completion(h, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
        h += [{"role": "assistant", "content": r1}, {"role": "user", "content": "what is 2+2?"}]
        r2 = llm.create_chat_completion(h, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    assert replies == [r1, r2]
    # end of input (Ctrl-D) ends the session too
    assert sambay("chat", "-m", str(model), "-n", "2", "-c", "64", stdin="hi\n").returncode == 0


def test_info(model):
    out = sambay("info", "-m", str(model), "-c", "1024")
    assert out.returncode == 0, out.stderr
    assert "architecture: phi4flash" in out.stdout
    assert "layers: 0:mamba 1:attn_swa 2:mamba 3:attn_swa 4:mamba 5:attn_full 6:gmu 7:attn_cross" in out.stdout
    assert "tensor types: F32" in out.stdout
    # the figures are the engine's own: those of a context of the same settings, every part
    # (the SWA rings hold n_swa + n_batch - 1 cells; the compute buffers count too)
    from sambay.engine import Context, Model

    line = next(s for s in out.stdout.splitlines() if s.startswith("memory at n_ctx=1024"))
    shown = dict(part.rsplit(" ", 2)[:2] for part in line.split(": ", 1)[1].split(", "))
    mem = Context(Model(str(model), device="cpu", use_extra_bufts=False), n_ctx=1024, n_batch=512,
                  kv_type="f16", n_threads=1).memory_breakdown()
    for part in ("weights", "mamba_conv", "mamba_ssm", "swa_kv", "full_kv", "compute"):
        assert shown[part] == f"{mem[part] / 2**20:.2f}", part
    assert mem["compute"] > 0 and mem["swa_kv"] > 0


def test_errors_are_one_line(model, tmp_path):
    out = sambay("run", "-m", str(tmp_path / "none.gguf"), "-p", "x")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"sambay run: error: model file not found: {tmp_path / 'none.gguf'}"]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 100)
    out = sambay("run", "-m", str(junk), "-p", "x")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
    out = sambay("--debug", "run", "-m", str(junk), "-p", "x")
    assert out.returncode == 1 and "Traceback" in out.stderr
    out = sambay("run", "-m", str(model))
    assert out.returncode == 1 and "give a prompt" in out.stderr
    out = sambay("run", "-m", str(model), "-p", "x", "--temp", "nan")
    assert out.returncode == 1 and "temperature" in out.stderr
    for cmd in ("convert", "quantize", "run", "chat", "info", "system-info"):
        h = sambay(cmd, "--help")
        assert h.returncode == 0 and "usage: sambay " + cmd in h.stdout


def test_prompt_from_p_f_and_api_decode_invalid_utf8_alike(model, tmp_path):
    raw = b"caf\xe9 \xff 12 +"
    prompt = tmp_path / "p.txt"
    prompt.write_bytes(raw)
    common = ["--raw", "-n", "6", "--temp", "0", "-c", "64", "-q"]
    from_f = sambay("run", "-m", str(model), "-f", str(prompt), *common)
    assert from_f.returncode == 0, from_f.stderr
    if os.name == "posix":  # argv carries bytes only there
        from_p = subprocess.run([sys.executable, "-m", "sambay", "run", "-m", str(model), "-p", raw,
                                 *common], capture_output=True, timeout=300)
        assert from_p.returncode == 0 and from_p.stdout.decode() == from_f.stdout
    with Llama(model, n_ctx=64, verbose=False) as llm:
        want = llm(raw, max_tokens=6, temperature=0)["choices"][0]["text"]
    assert from_f.stdout == want + "\n"


def test_usage_errors(model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("x")
    both = sambay("run", "-m", str(model), "-p", "x", "-f", str(prompt))
    assert both.returncode == 2 and "-f/--file: not allowed with argument -p/--prompt" in both.stderr
    neg = sambay("info", "-m", str(model), "-c", "-5")
    assert neg.returncode == 2 and "argument -c/--ctx-size: must be >= 0, got -5" in neg.stderr
    for cmd in ("run", "info"):
        out = sambay(cmd, "-m", str(tmp_path), *(["-p", "x"] if cmd == "run" else []))
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1] == (
            f"sambay {cmd}: error: {tmp_path}: is a folder; give the path of a .gguf file")


@pytest.mark.skipif(os.name != "posix", reason="a pipe closed by its reader")
def test_closed_stdout_ends_quietly(model):
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited
    try:
        out = subprocess.run([sys.executable, "-m", "sambay", "run", "-m", str(model), "-p", "x",
                              "-n", "4", "-q", "--raw"], stdout=write_end, stderr=subprocess.PIPE,
                             text=True, timeout=300)
    finally:
        os.close(write_end)
    assert out.returncode == 141 and out.stderr == "", out.stderr


_OUT_OF_MEMORY = """
import resource, sys
from sambay import cli
for line in open("/proc/self/status"):
    if line.startswith("VmSize:"):
        limit = int(line.split()[1]) * 1024 + 600 * 2**20  # 600 MiB more address space
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="RLIMIT_AS and /proc (ASan reserves terabytes of address space)")
@pytest.mark.parametrize("ctx, batch, message", [
    ("16777216", "512", "cannot allocate the context memory (4096 MiB for n_ctx 16777216) on CPU: out of "
                        "memory; a smaller n_ctx needs less"),
    ("1000000", "4096", "cannot reserve the compute buffers (n_ctx 1000000, n_batch 4096): out of memory; "
                        "a smaller n_ctx or n_batch needs less"),
])
def test_out_of_memory_is_one_line(ctx, batch, message):
    from sambay import demo_model_path

    out = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY, "run", "-m", demo_model_path(), "-c", ctx,
                          "-b", batch, "-p", "x", "-n", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"sambay run: error: {message}"]


def test_run_holds_the_answer_to_a_json_schema_or_a_grammar(tmp_path):
    pytest.importorskip("llguidance")
    import json

    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9999}},
              "required": ["answer"], "additionalProperties": False}
    # the built-in demo model: its trace stays free, the answer after </think> is the JSON
    out = sambay("run", "-p", "What is 347 + 582?", "--temp", "0", "--hide-thinking", "-q",
                 "--json-schema", json.dumps(schema))
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"answer"}
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    out = sambay("run", "-p", "Is 2 + 2 = 4?", "--temp", "0", "--hide-thinking", "-q", "--grammar-file", str(gbnf))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("yes", "no")
    out = sambay("run", "-p", "x", "-q", "-j", '{"type": "frob"}')
    assert out.returncode == 1 and "frob" in out.stderr and "Traceback" not in out.stderr
    out = sambay("run", "-p", "x", "-q", "-j", "{}", "--grammar", 'root ::= "a"')
    assert out.returncode == 2  # one of them
