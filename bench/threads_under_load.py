"""Decode and prefill speed with the CPU idle and busy, for thread settings of sambay and of
llama.cpp's transformer twin (llama-cpp-python), on the scaled-down shape of bench/peers.py.

    python -m bench.threads_under_load [--loads 0,1,2] [--repeats 5] [--workdir DIR]
        [--llamacpp-python /path/to/venv/bin/python] [--engines sambay,llamacpp] [--settings auto,1]

Busy loads are processes spinning ``while True: pass`` (started before, stopped after each
measurement). Every (engine, setting, load) runs in its own subprocess on ONE context, as a chat
or a server uses it: a warm-up round, then ``--repeats`` rounds of reset, prefill of
``--prompt`` tokens (micro-batches of ``--batch``) and ``--gen`` single-token decode steps. The
adaptive setting keeps what it learned across rounds (a context's thread choice outlives
``reset``). Settings: sambay ``old`` (the former defaults: decode on half the cores, prefill on
all), ``auto`` (the engine adapts, the default now), ``1``, ``2``; llama.cpp ``default``
(llama-cpp-python's: half the cores / all), ``1``, ``2``. The llama.cpp part runs with the
interpreter given by ``--llamacpp-python`` (one where ``import llama_cpp`` works).

Model files come from bench/peers.py's ``prepare`` (quick shape, Q4_0; shared ``--workdir``), or
``--sambay-model``/``--twin-model``. Results: ``bench/results/threads_under_load.json``/``.md``
(median tok/s with min–max over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import REPO, git_commit

SETTINGS = {
    "sambay": {"old": "old", "auto": None, "1": 1, "2": 2},
    "llamacpp": {"default": None, "1": 1, "2": 2},
}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _rounds(eval_prompt, eval_one, reset, a: argparse.Namespace) -> dict:
    """Warm-up, then the timed rounds: prefill and decode tok/s of each."""
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(1, 1000) for _ in range(a.prompt)]
    pre, dec = [], []
    for r in range(a.repeats + 1):
        reset()
        t0 = time.perf_counter()
        eval_prompt(prompt)
        t1 = time.perf_counter()
        for i in range(a.gen):
            eval_one(prompt[i % len(prompt)])
        t2 = time.perf_counter()
        if r > 0:
            pre.append(a.prompt / (t1 - t0))
            dec.append(a.gen / (t2 - t1))
    return {"prefill_tok_s": pre, "decode_tok_s": dec}


def _worker_sambay(a: argparse.Namespace) -> dict:
    from sambay.engine import Context, Model

    s = a.setting
    kw: dict[str, Any] = {}
    if s == "old":
        kw = {"n_threads": max(1, _cpus() // 2), "n_threads_batch": _cpus()}
    elif s != "auto":
        kw = {"n_threads": int(s), "n_threads_batch": int(s)}
    ctx = Context(Model(a.model), n_ctx=a.prompt + a.gen + 8, n_batch=a.batch, **kw)

    def eval_prompt(p):
        for i in range(0, len(p), a.batch):  # one call per micro-batch, as llama.cpp below
            ctx.eval(p[i:i + a.batch])

    out = _rounds(eval_prompt, lambda t: ctx.eval([t]), ctx.reset, a)
    out["threads"] = ctx.threads
    return out


def _worker_llamacpp(a: argparse.Namespace) -> dict:
    import llama_cpp

    kw: dict[str, Any] = {}
    if a.setting != "default":
        kw = {"n_threads": int(a.setting), "n_threads_batch": int(a.setting)}
    llm = llama_cpp.Llama(a.model, n_ctx=a.prompt + a.gen + 8, n_batch=a.batch, n_ubatch=a.batch,
                          n_gpu_layers=0, verbose=False, **kw)

    def eval_prompt(p):
        llm.eval(p)  # llama-cpp-python splits into n_batch chunks itself

    out = _rounds(eval_prompt, lambda t: llm.eval([t]), llm.reset, a)
    out["threads"] = {"n_threads": llm.n_threads if hasattr(llm, "n_threads") else None,
                      "context": [llm.context_params.n_threads, llm.context_params.n_threads_batch]}
    out["llama_cpp_python"] = llama_cpp.__version__
    return out


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _measure(engine: str, setting: str, load: int, model: Path, a: argparse.Namespace) -> dict:
    python = a.llamacpp_python if engine == "llamacpp" else sys.executable
    cmd = [python, "-m", "bench.threads_under_load", "--worker", engine, "--setting", setting,
           "--model", str(model), "--prompt", str(a.prompt), "--gen", str(a.gen), "--batch", str(a.batch),
           "--repeats", str(a.repeats)]
    busy = _busy(load)
    try:
        time.sleep(0.5)  # the loads are running before the engine starts
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {a.timeout:g} s"}
    finally:
        for b in busy:
            b.kill()
            b.wait()
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or f"exit {p.returncode}"}


def _cell(values: Optional[list[float]]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def report(res: dict) -> str:
    loads = res["loads"]
    lines = [f"# Threads under load ({res['machine']}, {res['cpus']} usable cores, commit {res['commit']})", "",
             f"Prompt {res['prompt']} tokens in micro-batches of {res['batch']}, then {res['gen']} decode steps; "
             f"{res['repeats']} rounds on one context after a warm-up; median tok/s (min–max). "
             "Load N: N processes spinning on the CPU.", ""]
    for what in ("prefill_tok_s", "decode_tok_s"):
        lines += [f"## {what.split('_')[0]}", "", "| engine | threads | " + " | ".join(f"load {n}" for n in loads) + " |",
                  "|---|---|" + "---|" * len(loads)]
        for key, by_load in res["runs"].items():
            eng, setting = key.split("/")
            cells = [_cell(by_load.get(str(n), {}).get(what)) if "error" not in by_load.get(str(n), {})
                     else "error" for n in loads]
            lines.append(f"| {eng} | {setting} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="sambay,llamacpp")
    ap.add_argument("--settings", help="only these settings, e.g. auto,1 (default: all of each engine)")
    ap.add_argument("--loads", default="0,1,2", help="numbers of busy processes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--sambay-model")
    ap.add_argument("--twin-model")
    ap.add_argument("--llamacpp-python", default=sys.executable)
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement (a cell)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = {"sambay": _worker_sambay, "llamacpp": _worker_llamacpp}[a.worker](a)
        print("RESULT " + json.dumps(res), flush=True)
        return

    from bench.peers import _machine, prepare

    engines = a.engines.split(",")
    models: dict[str, Path] = {}
    if a.sambay_model:
        models["sambay"] = Path(a.sambay_model)
    if a.twin_model:
        models["llamacpp"] = Path(a.twin_model)
    missing = [e for e in engines if e not in models]
    if missing:
        work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sambay-threads-"))
        work.mkdir(parents=True, exist_ok=True)
        files = prepare("quick", work, ["Q4_0"], missing)
        for e in missing:
            models[e] = files[f"{e}/Q4_0"]
    loads = [int(x) for x in a.loads.split(",")]
    res: dict[str, Any] = {"machine": _machine(), "cpus": _cpus(), "commit": git_commit(), "prompt": a.prompt,
                           "batch": a.batch, "gen": a.gen, "repeats": a.repeats, "loads": loads,
                           "models": {e: str(p) for e, p in models.items()}, "runs": {}}
    for eng in engines:
        for setting in SETTINGS[eng]:
            if a.settings and setting not in a.settings.split(","):
                continue
            runs = res["runs"].setdefault(f"{eng}/{setting}", {})
            for n in loads:
                r = _measure(eng, setting, n, models[eng], a)
                runs[str(n)] = r
                print(f"{eng} {setting} load {n}: prefill {_cell(r.get('prefill_tok_s'))}, "
                      f"decode {_cell(r.get('decode_tok_s'))} {r.get('error', '')}", flush=True)
                _write(res, Path(a.out))  # after every cell: a stopped run keeps what it measured
    print(report(res))


def _write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads_under_load.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "threads_under_load.md").write_text(report(res) + "\n")


if __name__ == "__main__":
    main()
