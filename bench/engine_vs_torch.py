"""Prefill and decode throughput of the ggml engine vs the PyTorch reference (CPU).

A random medium-size SambaY checkpoint (``convert/tiny.py``) is converted to GGUF and run by
both with the same thread count. Reports, never asserts; prints one JSON line per run.

    python bench/engine_vs_torch.py [--threads 2] [--prompt 512] [--gen 64] [--outtype f32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the PyTorch reference
sys.path.insert(0, str(REPO))  # run as a script: make `bench` importable

from bench.common import MEDIUM_SHAPE, git_commit  # noqa: E402

MEDIUM = {**MEDIUM_SHAPE, "sliding_window": 128}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = ap.parse_args()

    from sambay.convert import convert, tiny
    from sambay.engine import Context, Model

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny.make_config("tiny-12", overrides=MEDIUM)
        hf_dir = tiny.write_checkpoint(Path(tmp) / "hf", cfg, seed=0)
        gguf_path = Path(tmp) / "medium.gguf"
        convert(hf_dir, gguf_path, outtype=args.outtype, progress=False)
        prompt = rng.integers(0, MEDIUM["vocab_size"], args.prompt).tolist()
        result = {
            "commit": git_commit(),
            "model": MEDIUM,
            "outtype": args.outtype,
            "threads": args.threads,
            "n_prompt": args.prompt,
            "n_gen": args.gen,
        }

        model = Model(gguf_path)
        ctx = Context(model, n_ctx=args.prompt + args.gen + 8, n_batch=512,
                      n_threads=args.threads, n_threads_batch=args.threads)
        ctx.eval(prompt[:8])  # warm-up
        ctx.reset()
        t0 = time.perf_counter()
        logits = ctx.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(args.gen):
            logits = ctx.eval([int(np.argmax(logits[-1]))])
        t2 = time.perf_counter()
        result["engine"] = {
            "device": model.device,
            "prefill_tok_s": args.prompt / (t1 - t0),
            "decode_tok_s": args.gen / (t2 - t1),
            "memory": ctx.memory_breakdown(),
        }

        if not args.no_torch:
            from reference_model import load_reference

            ref = load_reference(hf_dir, dtype=torch.float32)
            cache = ref.new_cache()
            t0 = time.perf_counter()
            rl = ref.forward_incremental(prompt, cache)
            t1 = time.perf_counter()
            for _ in range(args.gen):
                rl = ref.forward_incremental([int(torch.argmax(rl[-1]))], cache)
            t2 = time.perf_counter()
            result["torch"] = {
                "prefill_tok_s": args.prompt / (t1 - t0),
                "decode_tok_s": args.gen / (t2 - t1),
            }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
