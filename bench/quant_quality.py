"""Quality of every quantization type against F32: KL divergence and top-1 agreement of the
next-token distributions, plus file size and load time.

    python -m bench.quant_quality [--quick] [--out bench/results]

Models: the tiny-12 test checkpoint and a larger random SambaY (hidden 512); both random
weights, so the figures measure how much each type perturbs the computation, not task
accuracy (the demo model's accuracy tests cover that). Writes quant_quality.json and
quant_quality.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sambay.convert import convert, tiny
from sambay.engine import Context, Model
from sambay.quantization import QUANT_TYPES, quantize

LARGE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
         "sliding_window": 64}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _all_logits(path: Path, seqs: list[np.ndarray]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    model = Model(path)
    load_s = time.perf_counter() - t0
    ctx = Context(model, n_ctx=max(len(s) for s in seqs), n_batch=256, logits_all=True, kv_type="f32")
    rows = []
    for s in seqs:
        ctx.reset()
        rows.append(ctx.eval(s))
    return np.concatenate(rows), load_s


def measure(name: str, hf_dir: Path, work: Path, n_seq: int, seq_len: int, seed: int = 0) -> list[dict]:
    f32 = convert(hf_dir, work / f"{name}-f32.gguf", outtype="f32", progress=False)
    n_vocab = Model(f32).n_vocab
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, n_vocab, seq_len) for _ in range(n_seq)]
    ref, load_ref = _all_logits(f32, seqs)
    ref_lp = _log_softmax(ref)
    ref_top = ref.argmax(-1)
    results = [{"model": name, "type": "F32", "kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0,
                "file_mib": f32.stat().st_size / 2**20, "load_s": load_ref, "positions": len(ref)}]
    for qtype in [t for t in QUANT_TYPES if t != "F32"]:
        out = work / f"{name}-{qtype}.gguf"
        quantize(f32, out, qtype, progress=False)
        logits, load_s = _all_logits(out, seqs)
        lp = _log_softmax(logits)
        kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)
        results.append({"model": name, "type": qtype, "kl_mean": float(kl.mean()),
                        "kl_p99": float(np.percentile(kl, 99)),
                        "top1": float((logits.argmax(-1) == ref_top).mean()),
                        "file_mib": out.stat().st_size / 2**20, "load_s": load_s,
                        "positions": len(ref)})
        out.unlink()
    return results


def to_markdown(results: list[dict]) -> str:
    lines = ["| model | type | KL mean | KL p99 | top-1 agree | file MiB | load s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['type']} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | "
                     f"{100 * r['top1']:.1f}% | {r['file_mib']:.2f} | {r['load_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer positions")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    n_seq, seq_len = (2, 256) if args.quick else (8, 512)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = tiny.write_checkpoint(work / "tiny-12", "tiny-12", seed=0)
        results += measure("tiny-12 (hidden 256)", small, work, n_seq, seq_len)
        large = tiny.write_checkpoint(work / "large", "tiny-12", seed=0,
                                      overrides=LARGE)
        results += measure("random (hidden 512)", large, work, n_seq, seq_len)
    (out / "quant_quality.json").write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    (out / "quant_quality.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
