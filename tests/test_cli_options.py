"""The command line's spellings: llama.cpp's option names as aliases, no abbreviations, help
that shows every default (issue 14)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from sambay import Llama
from sambay.cli import build_parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def sambay(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sambay", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_no_parser_takes_abbreviations(capsys):
    parser = build_parser()
    assert not parser.allow_abbrev
    assert all(not p.allow_abbrev for p in subparsers(parser).values())
    for argv in (["--deb", "list"], ["run", "--hide", "-p", "x"], ["run", "--mirostat-l", "1", "-p", "x"],
                 ["serve", "-m", "x", "--max-q", "3"], ["quantize", "a", "b", "Q8_0", "--qui"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err, argv


@pytest.mark.parametrize("command, argv, dest, value", [
    ("run", ["-cnv"], "conversation", True),  # not -c nv
    ("run", ["-cnv", "-no-cnv"], "conversation", False),
    ("run", ["-s", "5"], "seed", 5),
    ("run", ["--predict", "7"], "n_predict", 7),
    ("run", ["-tb", "3"], "threads_batch", 3),
    ("run", ["--gpu-layers", "0"], "n_gpu_layers", 0),
    ("run", ["-sys", "be terse"], "system", "be terse"),
    ("run", ["--system-prompt", "be terse"], "system", "be terse"),
    ("run", ["-r", "X", "--reverse-prompt", "Y", "--stop", "Z"], "stop", ["X", "Y", "Z"]),
    ("run", ["--repeat-last-n", "8"], "repeat_last_n", 8),
    ("run", ["-fa"], "flash_attn", "on"),
    ("run", ["-fa", "off"], "flash_attn", "off"),
    ("run", [], "flash_attn", "auto"),
    ("run", ["-ctk", "f32", "-ctv", "f32"], "cache_type_v", "f32"),
    ("run", ["--no-mmap"], "no_mmap", True),
    ("run", ["-jf", "s.json"], "json_schema_file", "s.json"),
    ("chat", ["-hfr", "o/n", "-hff", "*.gguf"], "hf_file", "*.gguf"),
    ("chat", ["--typical", "0.9", "--mirostat", "2", "--mirostat-lr", "0.2", "--mirostat-ent", "4"],
     "mirostat_ent", 4.0),
    ("serve", ["-m", "x", "-s", "3"], "seed", 3),
    ("serve", ["-m", "x", "-a", "phi"], "model_alias", "phi"),
    ("serve", ["-m", "x", "--model-alias", "phi"], "model_alias", "phi"),
    ("serve", ["-m", "x", "-tb", "2", "--gpu-layers", "0"], "threads_batch", 2),
    ("serve", ["-m", "x", "--ctx-size", "64"], "n_ctx", 64),
    ("serve", ["-m", "x", "-fa"], "flash_attn", "on"),
    ("serve", ["-m", "x", "-ctk", "f32", "-ctv", "f32"], "cache_type_k", "f32"),
    ("serve", ["-m", "x", "--no-mmap"], "no_mmap", True),
    ("serve", ["-m", "x", "--chat-template", "chatml"], "chat_template", "chatml"),
    ("run", ["--chat-template", "phi3"], "chat_template", "phi3"),
    ("chat", ["--chat-template-file", "t.jinja"], "chat_template_file", "t.jinja"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_llama_cpp_spellings(command, argv, dest, value):
    args = build_parser().parse_args([command, *argv])
    assert getattr(args, dest) == value


def test_every_option_has_help_and_shows_its_default():
    for name, p in subparsers(build_parser()).items():
        fmt = p.formatter_class(prog=p.prog)
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"sambay {name} {action.option_strings[-1]} has no help"
            shown = fmt._get_help_string(action)
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in shown, f"sambay {name} {action.option_strings[-1]}: {shown!r}"
    text = " ".join(sambay("run", "--help").stdout.split())
    assert "prompt tokens per step (default: 512)" in text


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("tiny-8", seed=1)[1]


def test_aliases_reach_the_model_and_sampler(model):
    messages = [{"role": "user", "content": "Compute 12 + 34"}]
    with Llama(model, n_ctx=128, verbose=False, seed=3, kv_type="f32", flash_attn=True) as llm:
        want = llm.create_chat_completion(messages, max_tokens=8, temperature=0.9, penalty_last_n=8,
                                          repeat_penalty=1.3, typical_p=0.9)["choices"][0]["message"]["content"]
    out = sambay("run", "-m", str(model), "-p", "Compute 12 + 34", "--predict", "8", "-s", "3", "--temp", "0.9",
                 "--repeat-last-n", "8", "--repeat-penalty", "1.3", "--typical", "0.9", "-ctk", "f32", "-fa",
                 "--no-mmap", "-c", "128", "-t", "1", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    out = sambay("run", "-m", str(model), "-p", "x", "-ctk", "f32", "-ctv", "f16")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "sambay run: error: type_k and type_v must be the same here (one type for both caches), got 'f32' and 'f16'"]


def test_conversation_flag_chats_with_the_prompt_as_system(model):
    system, turn = "You are terse.", "2+2?"
    with Llama(model, n_ctx=128, verbose=False) as llm:
        want = llm.create_chat_completion([{"role": "system", "content": system}, {"role": "user", "content": turn}],
                                          max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    out = sambay("run", "-m", str(model), "-cnv", "-p", system, "-n", "6", "--temp", "0", "-c", "128", "-t", "1",
                 stdin=turn + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"


def test_engine_options_reach_llama(monkeypatch, model):
    import sambay.llama
    from sambay import cli

    seen: dict = {}

    class Recorder:
        def __init__(self, path: str, **kw: object) -> None:
            seen.update(kw, path=path)

    monkeypatch.setattr(sambay.llama, "Llama", Recorder)
    cli._load(build_parser().parse_args(["run", "-m", str(model), "-fa", "-ctk", "bf16", "-ctv", "bf16",
                                         "--no-mmap", "-s", "4", "-tb", "2", "--gpu-layers", "0"]))
    assert (seen["flash_attn"], seen["type_k"], seen["type_v"], seen["use_mmap"], seen["seed"],
            seen["n_threads_batch"], seen["n_gpu_layers"]) == (True, "bf16", "bf16", False, 4, 2, 0)
    cli._load(build_parser().parse_args(["run", "-m", str(model)]))
    assert (seen["flash_attn"], seen["type_k"], seen["use_mmap"], seen["chat_template"]) == (False, None, True, None)
    cli._load(build_parser().parse_args(["chat", "-m", str(model), "--chat-template", "chatml"]))
    assert seen["chat_template"] == "chatml"


TEMPLATE = "{% for m in messages %}{{ m.role }} says {{ m.content }}. {% endfor %}Answer:"


def test_chat_template_options_replace_the_models_template(model, tmp_path):
    """run and chat render with --chat-template(-file): the prompt is the one the API renders
    with the same template (its token count, from the speed report), not the GGUF's."""
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    prompt = "Compute 12 + 34"
    messages = [{"role": "user", "content": prompt}]
    with Llama(model, n_ctx=128, verbose=False) as llm:
        n_own = len(llm.chat_prompt(messages)[1])
    with Llama(model, n_ctx=128, chat_template=TEMPLATE, verbose=False) as llm:
        n_file = len(llm.chat_prompt(messages)[1])
        want_text = llm.create_chat_completion(messages, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    with Llama(model, n_ctx=128, chat_template="chatml", verbose=False) as llm:
        n_chatml = len(llm.chat_prompt(messages)[1])
    assert len({n_own, n_file, n_chatml}) == 3  # the three templates are told apart
    out = sambay("run", "-m", str(model), "-p", prompt, "-n", "6", "--temp", "0", "-c", "128", "-t", "1",
                 "--chat-template-file", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == want_text + "\n"
    assert f"[prompt: {n_file} tokens" in out.stderr
    out = sambay("run", "-m", str(model), "-p", prompt, "-n", "1", "-c", "128", "-t", "1", "--chat-template", "chatml")
    assert out.returncode == 0 and f"[prompt: {n_chatml} tokens" in out.stderr, out.stderr
    out = sambay("chat", "-m", str(model), "-n", "6", "--temp", "0", "-c", "128", "-t", "1",
                 "--chat-template", TEMPLATE, stdin=prompt + "\n")
    assert out.returncode == 0 and out.stdout == want_text + "\n", out.stderr


def test_bad_chat_templates_are_one_line_errors(model, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")
    base = ("-m", str(model), "-p", "x", "-c", "128")
    for argv, line in (
        (("run", *base, "--chat-template-file", str(broken)),
         f"sambay run: error: chat template file {broken}: invalid chat template: "),
        (("run", *base, "--chat-template-file", str(tmp_path / "none.jinja")),
         f"sambay run: error: chat template file {tmp_path / 'none.jinja'}: No such file or directory"),
        (("run", *base, "--chat-template", "vicuna"), "sambay run: error: unknown chat template name 'vicuna'"),
        (("run", *base, "--raw", "--chat-template", "chatml"), "sambay run: error: --raw renders no chat template"),
        (("serve", "-m", str(model), "--chat-template-file", str(broken)),
         f"sambay serve: error: chat template file {broken}: invalid chat template: "),
    ):
        out = sambay(*argv)
        assert out.returncode == 1, argv
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), (argv, out.stderr)
    out = sambay("run", *base, "--chat-template", "chatml", "--chat-template-file", str(broken))
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


@pytest.mark.parametrize("argv, want", [
    ([], (None, None)),             # the engine adapts both
    (["-t", "1"], (1, 1)),          # as llama.cpp: -tb defaults to -t
    (["-t", "1", "-tb", "2"], (1, 2)),
    (["-tb", "0"], (None, 0)),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_thread_options_for_run_and_serve(argv, want):
    from sambay._options import thread_kwargs
    from sambay.server.settings import from_args

    args = build_parser().parse_args(["run", *argv])
    assert (thread_kwargs(args)["n_threads"], thread_kwargs(args)["n_threads_batch"]) == want
    s = from_args(build_parser().parse_args(["serve", "-m", "x", *argv]))
    assert (s.n_threads, s.n_threads_batch) == want
