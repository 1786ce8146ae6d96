"""Attention at depth on the CPU: sambay's attention kernel (``csrc/attn_cpu.*``) against ggml's
``mul_mat`` path (``SAMBAY_CPU_ATTN=0``, the engine before the kernel), in one run on one
machine, with the same threads: the peer of each figure is the same engine without the kernel.

    python -m bench.attn_cpu [--quick | --full] [--types Q4_0,Q4_K_M] [--depths 512,8192,32768,65536]
                             [--seqs 1] [--threads 2] [--gen 8] [--repeat 3] [--workdir DIR]

For each weight type, depth D and number of sequences S, ``--repeat`` times and alternating the
two paths: a fresh context of S sequences, each put at depth D by loading a filled state
(``bench/depth_fill.py``), one warm-up step, then ``--gen`` decode steps of one token per
sequence; aggregate tokens/s. Also the bandwidth bound: (weights + the K/V bytes a token reads
from the shared cache, 2 x n_embd_kv x 2 bytes x D per reading layer and sequence) / the
machine's read bandwidth (``bench/bandwidth.py``). The model files are ``bench/peers.py``'s
(same ``--workdir``). Results: ``bench/results/attn_cpu_<mode>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, git_commit
from bench.peers import _machine, _tokens, prepare

PATHS = {"ggml": "0", "kernel": "1"}  # SAMBAY_CPU_ATTN


def _reading_layers(hp: dict[str, Any]) -> int:
    """Layers that read the shared cache per token: the full-attention layer and the cross layers."""
    return sum(k in ("attn_full", "attn_cross") for k in hp["layer_types"])


def filled_state(model: Any, depth: int, threads: int) -> bytes:
    """A one-sequence state at ``depth`` (the same for both paths: only its headers come from a
    real 8-token evaluation, the cached values are zeros)."""
    from bench.depth_fill import sambay_state
    from sambay.engine import Context

    one = Context(model, n_ctx=64, n_threads=threads, n_threads_batch=threads)
    one.eval(_tokens(8, model.n_vocab, 2))
    return sambay_state(one.save_state(), model.hparams(), depth).tobytes()


def measure(model: Any, state: bytes, depth: int, n_seq: int, path: str, threads: int,
            gen: int) -> tuple[float, int]:
    """Aggregate decode tok/s on ``path``, and the bytes one step reads: the weights, and per
    sequence the shared cache's K/V of ``depth`` positions (the engine's own per-position size)
    times the layers that read it."""
    from sambay.engine import Context

    os.environ["SAMBAY_CPU_ATTN"] = PATHS[path]  # read when a context is created
    ctx = Context(model, n_ctx=depth + gen + 8, n_seq_max=n_seq, n_threads=threads, n_threads_batch=threads)
    for s in range(n_seq):
        ctx.load_state(state, seq=s)
    toks = _tokens(gen + 1, model.n_vocab, 1)
    ctx.decode([(s, [toks[0]]) for s in range(n_seq)])
    t = time.perf_counter()
    for tok in toks[1:]:
        ctx.decode([(s, [tok]) for s in range(n_seq)])
    tok_s = n_seq * gen / (time.perf_counter() - t)
    per_position = ctx.memory_breakdown()["full_kv"] / (ctx.n_ctx * n_seq)
    kv = per_position * depth * _reading_layers(model.hparams())
    return tok_s, int(model.weights_bytes + n_seq * kv)


def report(res: dict) -> str:
    lines = [f"# Attention at depth: sambay's CPU kernel vs ggml's mul_mat path ({res['mode']})", "",
             f"Commit {res['commit']}, {res['threads']} threads, {res['gen']} decode steps per run, "
             f"{res['repeat']} runs per cell alternating the two paths; {res['machine']}. Read bandwidth "
             f"({res['threads']} threads): {res['bandwidth_gb_s']:.1f} GB/s. Cells: median tok/s "
             "(min-max); ratio of medians; 'bound': the kernel's median as a share of "
             "(weights + K/V read) / bandwidth.", "",
             "| weights | depth | sequences | ggml path tok/s | kernel tok/s | kernel / ggml | bound |",
             "|---|---:|---:|---|---|---:|---:|"]
    for r in res["rows"]:
        g, k = r["ggml"], r["kernel"]
        lines.append(f"| {r['type']} | {r['depth']} | {r['seqs']} | {statistics.median(g):.2f} "
                     f"({min(g):.2f}-{max(g):.2f}) | {statistics.median(k):.2f} ({min(k):.2f}-{max(k):.2f}) | "
                     f"{statistics.median(k) / statistics.median(g):.2f}x | {100 * r['bound_share']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="scaled-down shape (the default)")
    mode.add_argument("--full", action="store_true", help="the real model sizes")
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--depths", default="512,8192,32768,65536")
    ap.add_argument("--seqs", default="1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    mode_name = "full" if a.full else "quick"
    import tempfile

    from bench.bandwidth import read_bandwidth

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sambay-attn-"))
    work.mkdir(parents=True, exist_ok=True)
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    files = prepare(mode_name, work, types, ["sambay"])
    bw = max(read_bandwidth(a.threads).values())  # the fastest reader, as bench.peers
    res: dict[str, Any] = {"mode": mode_name, "commit": git_commit(), "threads": a.threads, "gen": a.gen,
                           "repeat": a.repeat, "machine": _machine(), "bandwidth_gb_s": bw, "rows": []}
    from sambay.engine import Model

    for qt in types:
        model = Model(str(files[f"sambay/{qt}"]))
        for depth in (int(d) for d in a.depths.split(",")):
            state = filled_state(model, depth, a.threads)
            for n_seq in (int(s) for s in a.seqs.split(",")):
                row: dict[str, Any] = {"type": qt, "depth": depth, "seqs": n_seq, "ggml": [], "kernel": []}
                for _ in range(a.repeat):
                    for p in PATHS:
                        tok_s, step_bytes = measure(model, state, depth, n_seq, p, a.threads, a.gen)
                        row[p].append(tok_s)
                row["bytes_per_step"] = step_bytes
                row["bound_share"] = statistics.median(row["kernel"]) / n_seq * step_bytes / (bw * 1e9)
                res["rows"].append(row)
                print(report({**res, "rows": [row]}).splitlines()[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attn_cpu_{mode_name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"attn_cpu_{mode_name}.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
