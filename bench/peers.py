"""sambay against its peers: llama.cpp running the transformer twin (a ``phi3`` model of the same
width, depth, heads and vocab; ``bench/phi3_twin.py``), same thread count, same batch size.

    python -m bench.peers --quick [--types F16,Q8_0,Q4_0] [--flash-attn] [--threads 2] [--out bench/results]

Quick mode: a scaled-down shape (hidden 1024, 16 layers, 16 heads / 8 KV heads, FFN 2048,
vocab 32064; SambaY's sliding window is the real 512), F16 weights on both sides, prompts of
512 and 2048 tokens. Per depth D: prefill tok/s of a D-token prompt, then decode tok/s of the
next ``--gen`` tokens after that prefill (decode at depth D), the KV/state bytes at depth D and
the process's peak RSS. Each engine runs in its own subprocess so RSS is its own. Random
weights and random token ids: this measures speed and memory, not quality.

Needs llama-cpp-python (``pip install llama-cpp-python``) for the twin; without it only sambay
runs. Not part of the test suite. Writes ``peers_quick.json`` and ``peers_quick.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MEDIUM_SHAPE, REPO, git_commit


# The twin's shape; SambaY gets the same plus its own keys (the real sliding window).
SHAPE = MEDIUM_SHAPE
SAMBAY_EXTRA = {"sliding_window": 512}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    # ids below n_vocab - 2 (the twin's last two ids are its control tokens)
    return np.random.default_rng(seed).integers(0, n_vocab - 2, n).tolist()


# ---------------------------------------------------------------- workers (one subprocess each)

def _worker_sambay(a: argparse.Namespace) -> dict:
    from sambay.engine import Context, Model

    model = Model(a.model)
    out = {"device": model.device, "depths": {}}
    for depth in a.depths:
        n_ctx = depth + a.gen + 8
        ctx = Context(model, n_ctx=n_ctx, n_batch=a.batch, n_threads=a.threads, n_threads_batch=a.threads,
                      flash_attn=a.flash_attn)
        prompt = _tokens(depth, a.n_vocab, 0)
        gen = _tokens(a.gen, a.n_vocab, 1)
        ctx.eval(prompt[:8])  # warm-up (thread pool, graph allocation)
        ctx.reset()
        t0 = time.perf_counter()
        ctx.eval(prompt)
        t1 = time.perf_counter()
        for t in gen:
            ctx.eval([t])
        t2 = time.perf_counter()
        mem = ctx.memory_breakdown()
        # The full-attention KV is allocated for n_ctx cells; count the cells in use at depth D.
        state = mem.get("mamba_conv", 0) + mem.get("mamba_ssm", 0) + mem.get("swa_kv", 0)
        at_depth = state + mem.get("full_kv", 0) * depth / n_ctx
        out["depths"][str(depth)] = {
            "prefill_tok_s": depth / (t1 - t0),
            "decode_tok_s": a.gen / (t2 - t1),
            "kv_state_bytes": int(at_depth),
            "memory_breakdown": mem,
            "n_ctx": n_ctx,
        }
        del ctx
    return out


def _worker_llamacpp(a: argparse.Namespace) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    out = {"llama_cpp_python": llama_cpp.__version__, "depths": {}}
    for depth in a.depths:
        n_ctx = depth + a.gen + 8
        llm = Llama(a.model, n_ctx=n_ctx, n_batch=a.batch, n_ubatch=a.batch, n_threads=a.threads,
                    n_threads_batch=a.threads, n_gpu_layers=0, flash_attn=a.flash_attn, verbose=False)
        prompt = _tokens(depth, a.n_vocab, 0)
        gen = _tokens(a.gen, a.n_vocab, 1)
        llm.eval(prompt[:8])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for t in gen:
            llm.eval([t])
        t2 = time.perf_counter()
        cfg = a.shape
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * depth * 2  # F16 K and V
        out["depths"][str(depth)] = {
            "prefill_tok_s": depth / (t1 - t0),
            "decode_tok_s": a.gen / (t2 - t1),
            "kv_state_bytes": kv,
            "n_ctx": n_ctx,
        }
        llm.close()
        del llm
    return out


def _worker(a: argparse.Namespace) -> None:
    fn = {"sambay": _worker_sambay, "llamacpp": _worker_llamacpp}[a.worker]
    res = fn(a)
    res["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- driver

def _gguf_info(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {"params_m": sum(int(t.n_elements) for t in r.tensors) / 1e6,
            "file_mib": path.stat().st_size / 2**20}


def _run_worker(name: str, model: Path, a: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, "-m", "bench.peers", "--worker", name, "--model", str(model),
           "--threads", str(a.threads), "--gen", str(a.gen), "--batch", str(a.batch),
           "--depths", ",".join(map(str, a.depths)), "--shape", json.dumps(SHAPE)]
    if a.flash_attn:
        cmd.append("--flash-attn")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-2000:]}


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def _table(res: dict) -> str:
    depths = [str(d) for d in res["depths"]]
    head = ["engine", "weights", "params (M)", "file"]
    head += [f"prefill tok/s @{d}" for d in depths] + [f"decode tok/s @{d}" for d in depths]
    head += [f"KV+state @{d}" for d in depths] + ["peak RSS"]
    n_num = 3 * len(depths) + 1
    rows = []
    for qt in res["types"]:
        for key, label in (("sambay", "sambay (SambaY)"), ("llamacpp", "llama.cpp (phi3 twin)")):
            r = res["engines"].get(f"{key}/{qt}")
            if not r or "error" in r:
                why = (r or {}).get("error", res.get("llamacpp_error", "not run")).strip().splitlines()
                rows.append([label, qt, "-", "-"] + ["n/a"] * n_num)
                rows[-1][-1] = "n/a: " + (why[-1] if why else "not run")[:80].replace("|", "/")
                continue
            row = [label, qt, f"{r['params_m']:.1f}", f"{r['file_mib']:.0f} MiB"]
            row += [f"{r['depths'][d]['prefill_tok_s']:.1f}" for d in depths]
            row += [f"{r['depths'][d]['decode_tok_s']:.1f}" for d in depths]
            row += [_fmt_bytes(r["depths"][d]["kv_state_bytes"]) for d in depths]
            row += [f"{r['peak_rss_mib']:.0f} MiB"]
            rows.append(row)
        q = res.get("ratios", {}).get(qt)
        if q:
            row = [f"**ratio sambay / llama.cpp**", qt, "", ""]
            row += [f"{q[d]['prefill']:.2f}×" for d in depths] + [f"{q[d]['decode']:.2f}×" for d in depths]
            row += [f"{q[d]['kv_state']:.2f}×" for d in depths] + [f"{q['peak_rss']:.2f}×"]
            rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down shape, F16 (the only mode so far)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32, help="decoded tokens timed at each depth")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--depths", default="512,2048")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--types", default="F16", help="comma list of F16, Q8_0, Q4_0")
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on both sides (default off on both)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.depths = [int(x) for x in str(a.depths).split(",")]
    a.types = [t.strip() for t in a.types.split(",")]
    if a.worker:
        a.shape = json.loads(a.shape)
        a.n_vocab = a.shape["vocab_size"]
        _worker(a)
        return
    if not a.quick:
        ap.error("only --quick exists so far (the full-size run is still to do, issue 6)")

    from bench.phi3_twin import write_twin
    from sambay.convert import convert, tiny

    res = {"commit": git_commit(), "mode": "quick", "shape": SHAPE, "sambay_extra": SAMBAY_EXTRA,
           "threads": a.threads, "n_batch": a.batch, "n_gen": a.gen, "flash_attn": a.flash_attn,
           "depths": a.depths, "types": a.types, "cpu_count": os.cpu_count(), "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tiny.make_config("tiny-12", overrides={**SHAPE, **SAMBAY_EXTRA})
        hf = tiny.write_checkpoint(tmp / "hf", cfg, seed=0)
        sam_f16 = convert(hf, tmp / "sambay-F16.gguf", outtype="f16", progress=False)
        have_llama = False
        if not a.no_llamacpp:
            # only look: importing llama_cpp in a process that has loaded sambay's libggml binds
            # libllama to the wrong ggml (undefined symbols); the worker imports it alone
            import importlib.util

            have_llama = importlib.util.find_spec("llama_cpp") is not None
            if not have_llama:
                res["llamacpp_error"] = "llama-cpp-python is not installed"
        for qt in a.types:
            sam = sam_f16
            if qt != "F16":
                from sambay.quantization import quantize
                sam = tmp / f"sambay-{qt}.gguf"
                quantize(sam_f16, sam, qt, progress=False)
            r = _run_worker("sambay", sam, a)
            res["engines"][f"sambay/{qt}"] = {"engine": "sambay", "type": qt, **_gguf_info(sam), **r}
            print(f"sambay {qt}:", json.dumps(r)[:300], flush=True)
            if have_llama:
                twin = write_twin(tmp / f"twin-{qt}.gguf", SHAPE, qtype=qt)
                r = _run_worker("llamacpp", twin, a)
                res["engines"][f"llamacpp/{qt}"] = {"engine": "llama.cpp", "type": qt, **_gguf_info(twin), **r}
                print(f"llama.cpp {qt}:", json.dumps(r)[:300], flush=True)
                twin.unlink()

    res["ratios"] = {}
    for qt in a.types:
        s, l = res["engines"].get(f"sambay/{qt}", {}), res["engines"].get(f"llamacpp/{qt}", {})
        if "depths" in s and "depths" in l:
            q = {d: {k: s["depths"][d][m] / l["depths"][d][m]
                     for k, m in (("prefill", "prefill_tok_s"), ("decode", "decode_tok_s"),
                                  ("kv_state", "kv_state_bytes"))}
                 for d in map(str, a.depths)}
            q["peak_rss"] = s["peak_rss_mib"] / l["peak_rss_mib"]
            res["ratios"][qt] = q

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers_quick.json").write_text(json.dumps(res, indent=2) + "\n")
    md = (f"Peers, quick mode (commit {res['commit']}, {a.threads} threads, n_batch {a.batch}, "
          f"decode timed over {a.gen} tokens after a prefill of each depth; random weights)\n\n"
          + _table(res) + "\n")
    (out / "peers_quick.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
