"""Exact-match accuracy of the demo model with greedy decoding.

    python -m train.evaluate HF_DIR [--short 150 --long 150] [--gguf A.gguf B.gguf ...]

Decodes the fixed held-out set of train/data.py (``held_out_set(n_short, n_long)``, problems
never seen in training) greedily through the PyTorch reference (tests/reference_model.py,
prefill then one token at a time with its cache) and reports, for short and long-range
problems separately:

* answer exact-match: the integer after "The answer is" equals the true result;
* trace exact-match: the whole completion equals the reference worked trace token for token;
* perplexity of the reference completions (teacher forcing, completion tokens only).

With ``--gguf``, the same problems are also decoded greedily through the C++ engine
(``sambay.Llama``) for each file, with the engine's accuracy, how many completions are
identical to the reference's, and the engine's perplexity.

``greedy_completion_ids`` / ``score`` are also used by tests/test_demo_model.py.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from train import data  # noqa: E402

MAX_NEW = 120


def load_tokenizer(hf_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))


def reference_greedy(model, prompt_ids: Sequence[int], stop_ids: set, max_new: int = MAX_NEW):
    """Greedy token ids after the prompt (the stop token included if reached)."""
    import torch

    cache = model.new_cache()
    logits = model.forward_incremental(list(prompt_ids), cache)[-1]
    out = []
    for _ in range(max_new):
        t = int(torch.argmax(logits))
        out.append(t)
        if t in stop_ids:
            break
        logits = model.forward_incremental([t], cache)[-1]
    return out


def score(problems: Sequence[data.Problem], completions: Sequence[str]) -> dict:
    """Accuracy per subset: {"short": (answer_em, trace_em, n), "long": (...)}."""
    res = {}
    for name, want in (("short", False), ("long", True)):
        pairs = [(p, c) for p, c in zip(problems, completions) if p.long_range == want]
        if not pairs:
            continue
        ans = sum(data.parse_answer(c) == p.answer for p, c in pairs)
        trace = sum(c == p.completion for p, c in pairs)
        res[name] = (ans / len(pairs), trace / len(pairs), len(pairs))
    return res


def reference_perplexity(model, tok, problems: Sequence[data.Problem]) -> float:
    """exp(mean NLL) of the reference completions' tokens, teacher-forced."""
    import torch

    nll, n = 0.0, 0
    for p in problems:
        ids = tok.encode(p.text, add_special_tokens=False).ids
        k = len(tok.encode(p.prompt, add_special_tokens=False).ids)
        logp = torch.log_softmax(model.forward(ids).double(), -1)
        tgt = torch.tensor(ids[k:])
        nll -= float(logp[k - 1 : len(ids) - 1].gather(1, tgt[:, None]).sum())
        n += len(ids) - k
    return math.exp(nll / n)


def evaluate_reference(hf_dir: Path, problems: Sequence[data.Problem],
                       log: Optional[Callable[[str], None]] = None) -> list[str]:
    import torch
    from reference_model import load_reference

    model = load_reference(hf_dir)
    tok = load_tokenizer(hf_dir)
    stop = {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
    outs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps: more threads only spin (20x slower on 2 busy cores)
    try:
        for k, p in enumerate(problems):
            ids = reference_greedy(model, tok.encode(p.prompt, add_special_tokens=False).ids, stop)
            outs.append(tok.decode(ids, skip_special_tokens=False))
            if log and (k + 1) % 50 == 0:
                log(f"{k + 1}/{len(problems)}")
    finally:
        torch.set_num_threads(threads)
    return outs


def engine_greedy(llm, prompt_ids: Sequence[int], stop_ids: set, max_new: int = MAX_NEW):
    """Greedy token ids from ``sambay.Llama`` (the stop token included if reached)."""
    out = []
    for t in llm.generate(list(prompt_ids), temperature=0.0):
        out.append(int(t))
        if t in stop_ids or len(out) >= max_new:
            break
    return out


def evaluate_engine(gguf_path, problems: Sequence[data.Problem], n_threads: int = 1) -> list[str]:
    """Greedy completions of ``problems`` through the C++ engine (``sambay.Llama``), decoded
    with special tokens shown, like :func:`evaluate_reference`'s."""
    from sambay import Llama

    with Llama(str(gguf_path), n_ctx=512, n_threads=n_threads, n_threads_batch=n_threads,
               device="cpu", max_snapshots=0, verbose=False) as llm:
        tok = llm.tokenizer
        stop = {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
        outs = []
        for p in problems:
            ids = engine_greedy(llm, llm.tokenize(p.prompt, special=True), stop)
            outs.append(llm.detokenize(ids, special=True).decode("utf-8", errors="replace"))
    return outs


def engine_perplexity(gguf_path, problems: Sequence[data.Problem], n_threads: int = 1) -> float:
    """exp(mean NLL) of the reference completions' tokens through the engine, teacher-forced."""
    import numpy as np

    from sambay import Llama
    from sambay.engine import Context, Model

    with Llama(str(gguf_path), n_ctx=64, device="cpu", verbose=False) as llm:
        tokenize = lambda s: llm.tokenize(s, special=True)  # noqa: E731
        items = [(tokenize(p.text), len(tokenize(p.prompt))) for p in problems]
    model = Model(str(gguf_path), device="cpu")
    ctx = Context(model, n_ctx=512, n_threads=n_threads, n_threads_batch=n_threads,
                  logits_all=True)
    nll, n = 0.0, 0
    for ids, k in items:
        ctx.reset()
        logits = ctx.eval(np.asarray(ids, dtype=np.int64)).astype(np.float64)
        rows = logits[k - 1 : len(ids) - 1]
        m = rows.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(rows - m).sum(-1, keepdims=True)))[:, 0]
        nll -= float((rows[np.arange(len(rows)), ids[k:]] - logz).sum())
        n += len(ids) - k
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="greedy exact-match accuracy of the demo model")
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--short", type=int, default=150)
    ap.add_argument("--long", type=int, default=150)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show-errors", action="store_true")
    ap.add_argument("--gguf", type=Path, nargs="*", default=[],
                    help="also decode through the C++ engine with these GGUF files")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    problems = data.held_out_set(args.short, args.long, seed=args.seed)
    t0 = time.time()
    outs = evaluate_reference(args.hf_dir, problems, log=lambda s: print(s, flush=True))
    for name, (ans, trace, n) in score(problems, outs).items():
        print(f"reference {name:5s}: answer exact-match {ans:.3f}, trace exact-match {trace:.3f} "
              f"({n} problems)")
    if args.show_errors:
        for p, c in zip(problems, outs):
            if data.parse_answer(c) != p.answer:
                print(f"WRONG {p.op} {p.a} {p.b} long={p.long_range}: {c!r}")
    from reference_model import load_reference

    ppl = reference_perplexity(load_reference(args.hf_dir), load_tokenizer(args.hf_dir),
                               problems)
    print(f"reference perplexity of held-out completions: {ppl:.4f}")
    for path in args.gguf:
        eng = evaluate_engine(path, problems, n_threads=args.threads)
        res = score(problems, eng)
        same = sum(a == b for a, b in zip(eng, outs))
        print(f"engine {path.name}: " + ", ".join(
            f"{name} answer {ans:.3f} trace {trace:.3f}" for name, (ans, trace, n) in res.items())
            + f"; identical to the reference's completion: {same}/{len(problems)}; "
            f"perplexity {engine_perplexity(path, problems, n_threads=args.threads):.4f}",
            flush=True)
    print(f"took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
