"""sambay against its peers, side by side in one run on one machine, the same thread count:

* llama.cpp (llama-cpp-python) running the transformer twin: a random-weight ``phi3`` model
  (``bench/phi3_twin.py``) of Phi-4-mini's shape in full mode, of the scaled-down shape in
  quick mode; its quantized files come from llama.cpp's own quantizer.
* the PyTorch reference (``tests/reference_model.py``) on the same SambaY weights.

    python -m bench.peers --quick                  # scaled-down shape, F16, a few minutes
    python -m bench.peers --full [--types F16,Q8_0,Q4_K_M,Q4_0] [--prefill 512,2048,8192]
                          [--decode 512,2048,8192,32768] [--engines sambay,llamacpp,torch]
                          [--workdir DIR] [--gen 16] [--threads 2] [--flash-attn]

What is measured, per engine and weight type (each measurement in its own subprocess, so the
peak RSS is that measurement's own):

* prefill tok/s of an N-token prompt (a real prefill), then decode tok/s of ``--gen`` tokens
  right after it;
* decode tok/s at context depth D. The engine is put at depth D by loading a saved state of
  D zero-filled cached positions (``bench/depth_fill.py``), because really prefilling 32K
  tokens of a 3.8 B model on two threads takes most of an hour per engine and type; decode
  reads the same bytes whatever the cached values are. Quick mode measures both ways at the
  same depths, which checks the shortcut;
* KV + state bytes at each depth (the caches that grow: cells in use; the fixed ones: as
  allocated), peak RSS, and the machine's memory read bandwidth (``bench/bandwidth.py``) for
  the bandwidth bound of decode;
* the generation-latency curve: total time to generate 1K..32K tokens after a 64-token
  prompt, integrated over depth from the decode speeds measured at each depth (linear in
  depth between the measured points).

Results merge into ``bench/results/peers_<mode>.json`` (so a long run can be done in pieces),
and ``peers_<mode>.md`` and the ``peers_<mode>_*.png`` plots are redrawn from it. Random
weights and random token ids: this measures speed and memory, not quality. llama-cpp-python
is a benchmark-only dependency (``pip install llama-cpp-python``), in the same environment;
each engine runs in its own process because the two ggml builds cannot share one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import best_run, MEDIUM_SHAPE, REPO, git_commit
from bench.phi3_twin import PHI4_MINI_SHAPE

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "sambay": {**MEDIUM_SHAPE, "sliding_window": 512},  # on top of tiny-12
        "sambay_base": "tiny-12",
        "twin": MEDIUM_SHAPE,
        "types": ["F16"],
        "prefill": [512, 2048],
        "decode": [512, 2048],
        "gen": 32,
        "torch_dtype": "float32",
        "torch_prefill": [512],
    },
    "full": {
        "sambay": {},  # the real Phi-4-mini-flash-reasoning shape
        "sambay_base": "phi4-mini-flash",
        "twin": PHI4_MINI_SHAPE,
        "types": ["F16", "Q8_0", "Q4_K_M", "Q4_0"],
        "prefill": [512, 2048, 8192],
        "decode": [512, 2048, 8192, 32768],
        "gen": 16,
        "torch_dtype": "bfloat16",
        "torch_prefill": [512],
    },
}
WARMUP_TOKENS = 16  # a real prefill before a depth fill: warms up and yields a state to copy
LATENCY_PROMPT = 64
LATENCY_LENGTHS = [1024, 4096, 16384, 32768]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    # ids below n_vocab - 16: clear of both models' special and control tokens
    return np.random.default_rng(seed).integers(0, n_vocab - 16, n).tolist()


# ---------------------------------------------------------------- workers (one subprocess each)

def _time_prefill(reset, step, n: int, n_vocab: int) -> float:
    """Tokens/s of one n-token prefill from an empty context."""
    reset()
    prompt = _tokens(n, n_vocab, 0)
    t0 = time.perf_counter()
    step(prompt)
    return n / (time.perf_counter() - t0)


def _time_decode(step, gen: list[int]) -> float:
    for t in gen[:2]:  # warm-up: the first single-token graph is built and allocated
        step([t])
    t0 = time.perf_counter()
    for t in gen[2:]:
        step([t])
    return (len(gen) - 2) / (time.perf_counter() - t0)


def _worker_sambay(a: argparse.Namespace) -> dict:
    from bench.depth_fill import check_sambay, sambay_state
    from sambay.engine import Context, Model

    model = Model(a.model)
    n_vocab = model.n_vocab
    n = a.n
    ctx = Context(model, n_ctx=n + a.gen + WARMUP_TOKENS + 8, n_batch=a.batch, n_threads=a.threads,
                  n_threads_batch=a.threads, flash_attn=a.flash_attn)
    gen = _tokens(a.gen + 2, n_vocab, 1)
    out: dict[str, Any] = {"device": model.device}
    ctx.eval(_tokens(WARMUP_TOKENS, n_vocab, 2))
    if a.task == "prefill":
        out["prefill_tok_s"] = _time_prefill(ctx.reset, ctx.eval, n, n_vocab)
    else:
        real = ctx.save_state()
        hp = model.hparams()
        check_sambay(real, hp)
        ctx.load_state(sambay_state(real, hp, n).tobytes())
        assert ctx.n_past == n
    out["decode_tok_s"] = _time_decode(ctx.eval, gen)
    mem = ctx.memory_breakdown()
    state = mem.get("mamba_conv", 0) + mem.get("mamba_ssm", 0) + mem.get("swa_kv", 0)
    out["kv_state_bytes"] = int(state + mem.get("full_kv", 0) * n / ctx.n_ctx)
    out["memory_breakdown"] = mem
    out["weights_bytes"] = model.weights_bytes
    return out


def _worker_llamacpp(a: argparse.Namespace) -> dict:
    import ctypes

    import llama_cpp
    from llama_cpp import Llama

    from bench.depth_fill import check_llamacpp, llamacpp_state

    n = a.n
    llm = Llama(a.model, n_ctx=n + a.gen + WARMUP_TOKENS + 8, n_batch=a.batch, n_ubatch=a.batch,
                n_threads=a.threads, n_threads_batch=a.threads, n_gpu_layers=0, flash_attn=a.flash_attn,
                verbose=False)
    n_vocab = llm.n_vocab()
    gen = _tokens(a.gen + 2, n_vocab, 1)
    out: dict[str, Any] = {"llama_cpp_python": llama_cpp.__version__}
    llm.eval(_tokens(WARMUP_TOKENS, n_vocab, 2))
    if a.task == "prefill":
        out["prefill_tok_s"] = _time_prefill(llm.reset, llm.eval, n, n_vocab)
    else:
        c = llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(c, 0)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(c, buf, size, 0) != size:
            raise RuntimeError("llama_state_seq_get_data failed")
        real = bytes(buf)
        check_llamacpp(real)
        fake = llamacpp_state(real, n)
        llm.reset()
        ptr = fake.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(c, ptr, fake.nbytes, 0) != fake.nbytes:
            raise RuntimeError("llama_state_seq_set_data refused the filled state")
        del fake
        llm.n_tokens = n
        mem = llama_cpp.llama_get_memory(c)
        if llama_cpp.llama_memory_seq_pos_max(mem, 0) != n - 1:
            raise RuntimeError("the filled state did not put llama.cpp at the requested depth")
    out["decode_tok_s"] = _time_decode(llm.eval, gen)
    # F16 K and V of every layer, for the n cells in use at depth n
    cfg = a.shape
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    out["kv_state_bytes"] = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * n * 2
    llm.close()
    return out


def _worker_torch(a: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from reference_model import load_reference

    torch.set_num_threads(a.threads)
    ref = load_reference(a.model, dtype=getattr(torch, a.torch_dtype))
    n_vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    if a.task != "prefill":
        raise SystemExit("the PyTorch reference is only timed after a real prefill")
    with torch.inference_mode():
        cache = ref.new_cache()
        out = {"prefill_tok_s": _time_prefill(lambda: None, lambda t: ref.forward_incremental(t, cache), a.n, n_vocab),
               "dtype": a.torch_dtype}
        out["decode_tok_s"] = _time_decode(lambda t: ref.forward_incremental(t, cache),
                                           _tokens(a.gen + 2, n_vocab, 1))
    return out


def _worker(a: argparse.Namespace) -> None:
    fn = {"sambay": _worker_sambay, "llamacpp": _worker_llamacpp, "torch": _worker_torch}[a.worker]
    res = fn(a)
    res["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


def _run(cmd: list[str], a: argparse.Namespace, timeout: float | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS=str(a.threads))
    try:
        p = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-2000:]}


def _measure(engine: str, model: Path, task: str, n: int, a: argparse.Namespace, shape: dict) -> dict:
    cmd = ["bench.peers", "--worker", engine, "--model", str(model), "--task", task, "--n", str(n),
           "--threads", str(a.threads), "--gen", str(a.gen), "--batch", str(a.batch),
           "--shape", json.dumps(shape), "--torch-dtype", a.torch_dtype]
    if a.flash_attn:
        cmd.append("--flash-attn")
    t0 = time.perf_counter()
    r = _run(cmd, a, timeout=a.timeout)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


# ---------------------------------------------------------------- model files

def _quantize_twin(src: Path, dst: Path, qtype: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, its per-tensor rules), in a subprocess."""
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{qtype}\n"
        "p.nthread = 2\n"
        f"rc = llama_cpp.llama_model_quantize({str(src)!r}.encode(), {str(dst)!r}.encode(), p)\n"
        "sys.exit(rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0 or not dst.exists():
        raise RuntimeError(f"llama.cpp could not quantize the twin to {qtype}: {p.stderr[-500:]}")


def prepare(mode: str, workdir: Path, types: list[str], engines: list[str]) -> dict[str, Path]:
    """Write (or reuse) every model file the run needs; returns {"sambay/F16": path, ...}."""
    from bench.phi3_twin import write_twin
    from sambay.convert import convert, tiny
    from sambay.quantization import quantize

    m = MODES[mode]
    files: dict[str, Path] = {}
    hf = workdir / "hf"
    if not (hf / "config.json").exists():
        print(f"writing the random SambaY checkpoint ({m['sambay_base']}) to {hf}", flush=True)
        cfg = tiny.make_config(m["sambay_base"], overrides=m["sambay"])
        tiny.write_checkpoint(hf, cfg, seed=0, dtype="bfloat16" if mode == "full" else "float32",
                              sharded=mode == "full")
    files["torch/hf"] = hf
    if "sambay" in engines:
        f16 = workdir / "sambay-F16.gguf"
        if not f16.exists():
            convert(hf, f16, outtype="f16", progress=False)
        for qt in types:
            p = workdir / f"sambay-{qt}.gguf"
            if not p.exists():
                quantize(f16, p, qt, progress=False)
            files[f"sambay/{qt}"] = p
    if "llamacpp" in engines:
        f16 = workdir / "twin-F16.gguf"
        if not f16.exists():
            print("writing the phi3 twin", flush=True)
            write_twin(f16, m["twin"])
        for qt in types:
            p = workdir / f"twin-{qt}.gguf"
            if not p.exists():
                _quantize_twin(f16, p, qt)
            files[f"llamacpp/{qt}"] = p
    return files


def _gguf_info(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {"params_m": sum(int(t.n_elements) for t in r.tensors) / 1e6,
            "weights_mib": sum(int(t.n_bytes) for t in r.tensors) / 2**20,
            "file_mib": path.stat().st_size / 2**20}


# ---------------------------------------------------------------- derived figures

def latency_curve(decode: dict[str, dict], prefill_tok_s: float | None) -> dict[str, float]:
    """Seconds to generate N tokens after a LATENCY_PROMPT-token prompt, for N in LATENCY_LENGTHS.

    Time per token is interpolated linearly in depth between the measured depths (held flat
    outside them) and summed over every depth the generation passes through."""
    pts = sorted((int(d), 1.0 / r["decode_tok_s"]) for d, r in decode.items() if "decode_tok_s" in r)
    if len(pts) < 2:
        return {}
    depths, spt = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts])
    out = {}
    for n in LATENCY_LENGTHS:
        if n + LATENCY_PROMPT > depths[-1] * 1.05:
            continue  # never extrapolate past the deepest measurement
        d = np.arange(LATENCY_PROMPT, LATENCY_PROMPT + n, dtype=float)
        total = float(np.interp(d, depths, spt).sum())
        if prefill_tok_s:
            total += LATENCY_PROMPT / prefill_tok_s
        out[str(n)] = total
    return out


def derive(res: dict) -> None:
    """Ratios, latency curves, bandwidth bounds and target checks from the raw measurements."""
    bw = res.get("bandwidth", {}).get("read_gb_s")
    for key, e in res["engines"].items():
        pf = e.get("prefill", {})
        first = pf.get(str(min(map(int, pf))) if pf else "", {})
        e["latency_s"] = latency_curve(e.get("decode", {}), first.get("prefill_tok_s"))
        if bw and "weights_mib" in e:
            for d, r in e.get("decode", {}).items():
                if "decode_tok_s" in r:
                    per_token = e["weights_mib"] * 2**20 + r.get("kv_state_bytes", 0)
                    r["bandwidth_bound_tok_s"] = bw * 1e9 / per_token
                    r["fraction_of_bound"] = r["decode_tok_s"] / r["bandwidth_bound_tok_s"]
    ratios: dict[str, dict] = {}
    for qt in res["types"]:
        s, l = res["engines"].get(f"sambay/{qt}", {}), res["engines"].get(f"llamacpp/{qt}", {})
        q: dict[str, Any] = {"prefill": {}, "decode": {}, "kv_state": {}, "latency": {}}
        for n, r in s.get("prefill", {}).items():
            o = l.get("prefill", {}).get(n, {})
            if "prefill_tok_s" in r and "prefill_tok_s" in o:
                q["prefill"][n] = r["prefill_tok_s"] / o["prefill_tok_s"]
        for d, r in s.get("decode", {}).items():
            o = l.get("decode", {}).get(d, {})
            if "decode_tok_s" in r and "decode_tok_s" in o:
                q["decode"][d] = r["decode_tok_s"] / o["decode_tok_s"]
                q["kv_state"][d] = r["kv_state_bytes"] / o["kv_state_bytes"]
        for n, t in s.get("latency_s", {}).items():
            if n in l.get("latency_s", {}):
                q["latency"][n] = l["latency_s"][n] / t  # > 1: sambay finishes sooner
        ratios[qt] = q
    res["ratios"] = ratios
    t = res["engines"].get("torch/" + res.get("torch_dtype", ""), {})
    tp = t.get("prefill", {})
    if tp:
        n = str(min(map(int, tp)))
        for qt in res["types"]:
            s = res["engines"].get(f"sambay/{qt}", {}).get("prefill", {}).get(n, {})
            if "decode_tok_s" in s and "decode_tok_s" in tp[n]:
                ratios[qt]["vs_torch_decode"] = s["decode_tok_s"] / tp[n]["decode_tok_s"]
                ratios[qt]["vs_torch_prefill"] = s["prefill_tok_s"] / tp[n]["prefill_tok_s"]


# ---------------------------------------------------------------- report

def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _cell(d: dict, key: str, fmt: str = "{:.2f}") -> str:
    if "error" in d:
        return "error"
    return fmt.format(d[key]) if key in d else "-"


def report(res: dict) -> str:
    labels = {"sambay": "sambay (SambaY)", "llamacpp": "llama.cpp (phi3 twin)", "torch": "PyTorch reference"}
    pf_n = sorted({int(n) for e in res["engines"].values() for n in e.get("prefill", {})})
    dc_n = sorted({int(n) for e in res["engines"].values() for n in e.get("decode", {})})
    bw = res.get("bandwidth", {})
    out = [f"# Peers, {res['mode']} mode\n",
           f"Commit {res.get('commit')}, {res['threads']} threads for every engine, n_batch {res['n_batch']}, "
           f"decode timed over {res['n_gen']} tokens; {res.get('machine', '')}. "
           f"Memory read bandwidth ({bw.get('threads', '?')} threads): {bw.get('read_gb_s', float('nan')):.1f} GB/s. "
           f"sambay's ggml CPU backend: {res.get('sambay_ggml', 'not recorded')}. "
           "Random weights, random token ids. Decode at a depth: after loading a state of that many "
           "zero-filled positions (see bench/depth_fill.py); 'decode after prefill': after a real prefill. "
           "Where a measurement was repeated (`--repeat`), the best run is shown and the JSON lists every run "
           "(`runs`).\n"]
    head = ["engine", "weights", "params", "weights size"] + [f"prefill tok/s @{n}" for n in pf_n]
    head += [f"decode after prefill @{n}" for n in pf_n] + [f"decode tok/s @{d}" for d in dc_n]
    rows = []
    keys = sorted(res["engines"], key=lambda k: (res["types"].index(k.split("/")[1])
                                                 if k.split("/")[1] in res["types"] else 99, k))
    for k in keys:
        e = res["engines"][k]
        eng, qt = k.split("/")
        row = [labels.get(eng, eng), qt, f"{e.get('params_m', 0) / 1e3:.2f} B" if "params_m" in e else "-",
               _mib(e["weights_mib"] * 2**20) if "weights_mib" in e else "-"]
        row += [_cell(e.get("prefill", {}).get(str(n), {}), "prefill_tok_s", "{:.1f}") for n in pf_n]
        row += [_cell(e.get("prefill", {}).get(str(n), {}), "decode_tok_s") for n in pf_n]
        row += [_cell(e.get("decode", {}).get(str(d), {}), "decode_tok_s") for d in dc_n]
        rows.append(row)
    out += ["## Speed\n", _table(head, rows), ""]

    head = ["weights"] + [f"prefill @{n}" for n in pf_n] + [f"decode @{d}" for d in dc_n]
    head += [f"latency {int(n) // 1024}K gen" for n in LATENCY_LENGTHS] + ["decode vs PyTorch"]
    rows = []
    for qt, q in res.get("ratios", {}).items():
        row = [qt] + [f"{q['prefill'][str(n)]:.2f}×" if str(n) in q["prefill"] else "-" for n in pf_n]
        row += [f"{q['decode'][str(d)]:.2f}×" if str(d) in q["decode"] else "-" for d in dc_n]
        row += [f"{q['latency'][str(n)]:.2f}×" if str(n) in q["latency"] else "-" for n in LATENCY_LENGTHS]
        row += [f"{q['vs_torch_decode']:.1f}×" if "vs_torch_decode" in q else "-"]
        rows.append(row)
    out += ["## sambay / llama.cpp (speed ratios; latency: the twin's time ÷ sambay's)\n",
            _table(head, rows), ""]

    head = ["engine", "weights"] + [f"KV+state @{d}" for d in dc_n] + [f"peak RSS @{d}" for d in dc_n]
    head += [f"decode / bandwidth bound @{d}" for d in dc_n[:1]]
    rows = []
    for k in keys:
        e = res["engines"][k]
        if not e.get("decode"):
            continue
        eng, qt = k.split("/")
        dd = e["decode"]
        row = [labels.get(eng, eng), qt]
        row += [_mib(dd[str(d)]["kv_state_bytes"]) if "kv_state_bytes" in dd.get(str(d), {}) else "-" for d in dc_n]
        row += [_mib(dd[str(d)]["peak_rss_mib"] * 2**20) if "peak_rss_mib" in dd.get(str(d), {}) else "-"
                for d in dc_n]
        row += [f"{dd[str(d)]['fraction_of_bound'] * 100:.0f}%" if "fraction_of_bound" in dd.get(str(d), {})
                else "-" for d in dc_n[:1]]
        rows.append(row)
    out += ["## Memory\n", _table(head, rows), ""]

    head = ["engine", "weights"] + [f"{int(n) // 1024}K tokens" for n in LATENCY_LENGTHS]
    rows = [[labels.get(k.split("/")[0]), k.split("/")[1]]
            + [f"{res['engines'][k]['latency_s'][str(n)]:,.0f} s" if str(n) in res["engines"][k].get("latency_s", {})
               else "-" for n in LATENCY_LENGTHS] for k in keys if res["engines"][k].get("latency_s")]
    out += [f"## Generation latency (after a {LATENCY_PROMPT}-token prompt; from the decode speeds by depth)\n",
            _table(head, rows), ""]
    return "\n".join(out) + "\n"


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def finish(fig, ax, what: str, legend_size: int = 7) -> None:
        ax.legend(fontsize=legend_size)
        ax.grid(alpha=0.3)
        made.append(out / f"{res.get('stem') or 'peers_' + res['mode']}_{what}.png")
        fig.tight_layout()
        fig.savefig(made[-1], dpi=110)

    colors = dict(zip(res["types"], ["C0", "C1", "C2", "C3", "C4", "C5"]))
    style = {"sambay": "-", "llamacpp": "--", "torch": ":"}
    name = {"sambay": "sambay", "llamacpp": "llama.cpp twin", "torch": "PyTorch"}

    def each():
        for k, e in sorted(res["engines"].items()):
            eng, qt = k.split("/")
            yield eng, qt, e, dict(color=colors.get(qt, "k"), linestyle=style.get(eng, "-"), marker="o",
                                   label=f"{name.get(eng, eng)} {qt}")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eng, qt, e, kw in each():
        lat = e.get("latency_s", {})
        if lat:
            xs = sorted(map(int, lat))
            ax.plot(xs, [lat[str(x)] for x in xs], **kw)
    ax.set(xlabel="generated tokens (after a 64-token prompt)", ylabel="total time (s)", xscale="log", yscale="log",
           title=f"Generation latency, {res['threads']} CPU threads")
    finish(fig, ax, "latency")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eng, qt, e, kw in each():
        dd = {int(d): r["decode_tok_s"] for d, r in e.get("decode", {}).items() if "decode_tok_s" in r}
        if dd:
            xs = sorted(dd)
            ax.plot(xs, [dd[x] for x in xs], **kw)
    ax.set(xlabel="context depth (tokens)", ylabel="decode tokens/s", xscale="log",
           title=f"Decode speed vs depth, {res['threads']} CPU threads")
    finish(fig, ax, "decode")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eng, qt, e, kw in each():
        dd = {int(d): r["kv_state_bytes"] for d, r in e.get("decode", {}).items() if "kv_state_bytes" in r}
        if dd and qt == res["types"][0]:
            xs = sorted(dd)
            ax.plot(xs, [dd[x] / 2**20 for x in xs], **{**kw, "label": f"{name.get(eng)} KV+state"})
        rss = {int(d): r["peak_rss_mib"] for d, r in e.get("decode", {}).items() if "peak_rss_mib" in r}
        if rss:
            xs = sorted(rss)
            ax.plot(xs, [rss[x] for x in xs], **{**kw, "marker": "s", "alpha": 0.6,
                                                   "label": f"{name.get(eng)} {qt} peak RSS"})
    ax.set(xlabel="context depth (tokens)", ylabel="MiB", xscale="log", yscale="log",
           title="Memory vs context depth")
    finish(fig, ax, "memory", 6)
    plt.close("all")
    return made


# ---------------------------------------------------------------- driver

def _ggml_build() -> str:
    """The ggml sambay runs on here: its CPU backend's features (the wheel's portable build or a
    source build for this CPU, scripts/build-ggml.sh)."""
    from sambay import system_info

    return " ".join(system_info()["cpu_features"])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="scaled-down shape (the default)")
    mode.add_argument("--full", action="store_true", help="the real model sizes (hours at every setting)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, help="decoded tokens timed at each depth")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--types", help="comma list of F16, Q8_0, Q4_K_M, Q4_0 (and other types both quantize)")
    ap.add_argument("--prefill", help="prompt lengths to time prefill at (comma list)")
    ap.add_argument("--decode", help="context depths to time decode at (comma list)")
    ap.add_argument("--engines", default="sambay,llamacpp,torch")
    ap.add_argument("--workdir", help="where model files are written and reused (default: a temporary folder)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on both sides (default off on both)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one measurement may take")
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of merging")
    ap.add_argument("--repeat", type=int, default=1, help="run each measurement this many times, keep the best")
    ap.add_argument("--report-only", action="store_true", help="redraw the markdown and plots from the JSON")
    ap.add_argument("--name", help="results file stem (default peers_<mode>), e.g. peers_quick_native for a run "
                    "with a source-built ggml (scripts/build-ggml.sh)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--torch-dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.shape = json.loads(a.shape)
        _worker(a)
        return

    mname = "full" if a.full else "quick"
    m = MODES[mname]
    a.gen = a.gen or m["gen"]
    a.torch_dtype = m["torch_dtype"]
    types = a.types.split(",") if a.types else m["types"]
    # an empty list ("--decode ''") skips that kind of measurement
    prefill = [int(x) for x in a.prefill.split(",") if x] if a.prefill is not None else m["prefill"]
    decode = [int(x) for x in a.decode.split(",") if x] if a.decode is not None else m["decode"]
    engines = a.engines.split(",")
    if "llamacpp" in engines:
        import importlib.util  # only look: importing llama_cpp next to sambay's ggml breaks both

        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: running without the llama.cpp twin", flush=True)
            engines.remove("llamacpp")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"peers_{mname}"
    res_path = out / f"{stem}.json"
    res: dict[str, Any] = {}
    if res_path.exists() and not a.fresh:
        res = json.loads(res_path.read_text())
        ggml = res.get("sambay_ggml") if a.report_only else _ggml_build()
        if res.get("threads") != a.threads or res.get("flash_attn") != a.flash_attn \
                or res.get("sambay_ggml", ggml) != ggml:
            res = {}  # other settings or another ggml build: start over
    res.setdefault("engines", {})
    res.update(mode=mname, commit=git_commit(), machine=_machine(), threads=a.threads, n_batch=a.batch,
               n_gen=a.gen, flash_attn=a.flash_attn, torch_dtype=a.torch_dtype,
               sambay_shape={"base": m["sambay_base"], **m["sambay"]}, twin_shape=m["twin"],
               stem=stem)
    if not a.report_only or "sambay_ggml" not in res:
        res["sambay_ggml"] = _ggml_build()
    res["types"] = list(dict.fromkeys(res.get("types", []) + types))

    if a.report_only:
        derive(res)
        (out / f"{stem}.md").write_text(report(res))
        print("wrote", out / f"{stem}.md", *plots(res, out))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        files = prepare(mname, workdir, types, engines)
        if decode:  # the bound of decode: measured in the same invocation as the decode speeds
            bw = _run(["bench.bandwidth", "--threads", str(a.threads), "--json"], a)
            if "read_gb_s" in bw:
                res["bandwidth"] = bw
            print("bandwidth:", json.dumps(bw), flush=True)

        # cheapest first, so an interrupted full run still has every decode depth: decode at
        # each depth, then prefill by increasing length; the two engines side by side
        jobs: list[tuple[str, str, Path, str, int, dict]] = []
        for task, sizes in (("decode", decode), ("prefill", prefill)):
            for n in sizes:
                for qt in types:
                    for eng in ("sambay", "llamacpp"):
                        if eng in engines:
                            shape = m["twin"] if eng == "llamacpp" else m["sambay"]
                            jobs.append((eng, qt, files[f"{eng}/{qt}"], task, n, shape))
                if task == "prefill" and "torch" in engines and n in m["torch_prefill"]:
                    jobs.append(("torch", a.torch_dtype, files["torch/hf"], "prefill", n, m["sambay"]))
        for eng, qt, model, task, n, shape in jobs:
            # --repeat: the best of several runs (the machine's speed drifts with its neighbours)
            key = "prefill_tok_s" if task == "prefill" else "decode_tok_s"
            r = best_run([_measure(eng, model, task, n, a, shape) for _ in range(a.repeat)], key)
            r["commit"] = res["commit"]
            print(f"{eng} {qt} {task} {n}:", json.dumps({k: v for k, v in r.items() if k != 'memory_breakdown'})[:400],
                  flush=True)
            e = res["engines"].setdefault(f"{eng}/{qt}", {"engine": eng, "type": qt})
            if eng != "torch":
                e.update(_gguf_info(model))
            e.setdefault(task, {})[str(n)] = r
            derive(res)
            res_path.write_text(json.dumps(res, indent=2) + "\n")

    derive(res)
    res_path.write_text(json.dumps(res, indent=2) + "\n")
    md = report(res)
    (out / f"{stem}.md").write_text(md)
    made = plots(res, out)
    print(md)
    print("wrote", res_path, *made)


if __name__ == "__main__":
    main()
