"""Where a step's time goes, per kind of graph node (``Context.op_profile``, SAMBAY_PROFILE=1).

    python -m bench.op_profile MODEL.gguf [--seqs 1,16] [--depth 512] [--prefill 512]
                               [--steps 16] [--threads 2] [--top 25] [--json OUT]

For each number of sequences: decode steps of one token per sequence at ``--depth`` (every
sequence put there by loading a state of that many zero-filled positions, bench/depth_fill.py),
and one ``--prefill``-token prompt from an empty context. Each is timed twice: unprofiled (the
real step time) and profiled (the graph run one node at a time, each node timed). The profiled
total is larger by the per-node dispatch; the table gives each kind's share of the profiled
total and its milliseconds per step, and the unprofiled step time next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

# node kinds by what they compute (the key's first word is ggml's op name)
GROUPS = (
    ("weights", lambda k: k.startswith(("MUL_MAT ", "GET_ROWS ", "CUSTOM mm_cpu ")) and k.endswith(".weight")),
    ("attention", lambda k: k.startswith(("CUSTOM attn_", "SOFT_MAX", "FLASH_ATTN", "MUL_MAT cache_"))),
    ("mamba scan/conv", lambda k: k.startswith(("SSM_SCAN", "SSM_CONV"))),
)


def _tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def _run(model: Any, scenario: str, n_seq: int, depth: int, n: int, threads: int, profile: bool,
         state: bytes | None) -> tuple[float, dict[str, tuple[int, float]]]:
    """Seconds per step (decode) or per prompt (prefill), and the profile if ``profile``."""
    from sambay.engine import Context

    os.environ["SAMBAY_PROFILE"] = "1" if profile else "0"  # read when a context is made
    try:
        if scenario == "decode":
            ctx = Context(model, n_ctx=depth + n + 8, n_seq_max=n_seq, n_threads=threads, n_threads_batch=threads)
            for s in range(n_seq):
                ctx.load_state(state, seq=s)
            toks = _tokens(n + 1, model.n_vocab, 1)
            ctx.decode([(s, [toks[0]]) for s in range(n_seq)])  # warm-up: graph built, buffers touched
            ctx.reset_op_profile()
            t = time.perf_counter()
            for tok in toks[1:]:
                ctx.decode([(s, [tok]) for s in range(n_seq)])
            per = (time.perf_counter() - t) / n
        else:
            ctx = Context(model, n_ctx=n + 8, n_threads=threads, n_threads_batch=threads)
            ctx.eval(_tokens(8, model.n_vocab, 2))
            ctx.reset()
            ctx.reset_op_profile()
            t = time.perf_counter()
            ctx.eval(_tokens(n, model.n_vocab, 0))
            per = time.perf_counter() - t
        return per, ctx.op_profile()
    finally:
        os.environ.pop("SAMBAY_PROFILE", None)


def summarise(prof: dict[str, tuple[int, float]], steps: int, top: int) -> dict[str, Any]:
    total = sum(s for _, s in prof.values()) or 1.0
    rows = sorted(prof.items(), key=lambda kv: -kv[1][1])
    groups: dict[str, float] = {}
    for k, (_, s) in prof.items():
        g = next((name for name, match in GROUPS if match(k)), "other")
        groups[g] = groups.get(g, 0.0) + s
    return {
        "total_ms_per_step": 1000 * total / steps,
        "nodes_per_step": sum(c for c, _ in prof.values()) / steps,
        "groups": {g: {"share": s / total, "ms_per_step": 1000 * s / steps} for g, s in groups.items()},
        "top": [{"kind": k, "nodes_per_step": c / steps, "ms_per_step": 1000 * s / steps, "share": s / total}
                for k, (c, s) in rows[:top]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--seqs", default="1,16", help="comma list of sequence counts decoded together")
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length profiled (0: none)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()

    from bench.attn_cpu import filled_state
    from sambay.engine import Model

    model = Model(a.model)
    state = filled_state(model, a.depth, a.threads)
    out: dict[str, Any] = {"model": str(a.model), "depth": a.depth, "threads": a.threads, "runs": {}}
    scenarios = [("decode", int(s), a.steps) for s in a.seqs.split(",") if s]
    if a.prefill:
        scenarios.append(("prefill", 1, a.prefill))
    for scenario, n_seq, n in scenarios:
        plain, _ = _run(model, scenario, n_seq, a.depth, n, a.threads, False, state)
        profiled, prof = _run(model, scenario, n_seq, a.depth, n, a.threads, True, state)
        steps = n if scenario == "decode" else 1
        s = summarise(prof, steps, a.top)
        s.update(step_ms=1000 * plain, profiled_step_ms=1000 * profiled)
        name = f"{scenario} {n_seq} seq" if scenario == "decode" else f"prefill {n}"
        out["runs"][name] = s
        tokens = n_seq if scenario == "decode" else n
        print(f"\n## {name}{' at depth ' + str(a.depth) if scenario == 'decode' else ''}: "
              f"{1000 * plain:.1f} ms per step unprofiled ({1000 * plain / tokens:.2f} ms per token), "
              f"{1000 * profiled:.1f} ms profiled, {s['nodes_per_step']:.0f} nodes per step")
        for g, v in sorted(s["groups"].items(), key=lambda kv: -kv[1]["share"]):
            print(f"  {g:<18} {100 * v['share']:5.1f}%  {v['ms_per_step']:8.2f} ms")
        print(f"  {'kind':<44} {'nodes':>6} {'ms':>8} {'share':>6}")
        for r in s["top"]:
            print(f"  {r['kind']:<44} {r['nodes_per_step']:6.0f} {r['ms_per_step']:8.2f} {100 * r['share']:5.1f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
