"""Per-token cost of sampling + streaming detokenization at the real vocabulary size (200064).

    python -m bench.sampling_overhead [--tokens 2000]

Runs on one core (the sampler is single-threaded Python + a small native top-k). Target: well
under a decode step, < 2 ms per token. Prints a table and writes
bench/results/sampling_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sambay.sampling import SamplingParams, make_rng, sample
from sambay.tokenizer import StreamDecoder, Tokenizer

N_VOCAB = 200064


def synthetic_tokenizer(n_vocab: int) -> Tokenizer:
    """A byte-level vocabulary of n_vocab tokens (the 256 bytes plus random byte strings)."""
    from sambay.tokenizer import _byte_level_alphabet

    char_of = {b: c for c, b in _byte_level_alphabet().items()}
    rng = np.random.default_rng(0)
    tokens = [char_of[b] for b in range(256)]
    seen = set(tokens)
    while len(tokens) < n_vocab:
        s = "".join(char_of[int(b)] for b in rng.integers(32, 127, rng.integers(2, 9)))
        if s not in seen:
            seen.add(s)
            tokens.append(s)
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * n_vocab,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.eos_token_id": n_vocab - 1}
    return Tokenizer.from_metadata(meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    tok = synthetic_tokenizer(N_VOCAB)
    rng = np.random.default_rng(1)
    logits = [rng.standard_normal(N_VOCAB).astype(np.float32) * 4 for _ in range(16)]
    configs = {
        "greedy": SamplingParams(temperature=0.0),
        "default (top-k 40, top-p 0.95, min-p 0.05, T 0.8)": SamplingParams(),
        "default + penalties": SamplingParams(repeat_penalty=1.1, presence_penalty=0.3,
                                              frequency_penalty=0.1),
        "top-k off (full sort), top-p 0.95": SamplingParams(top_k=0),
    }
    results = {}
    for name, params in configs.items():
        r = make_rng(0)
        dec = StreamDecoder(tok)
        history: list[int] = []
        t0 = time.perf_counter()
        for i in range(args.tokens):
            t = sample(logits[i % len(logits)], params, r, history)
            history.append(t)
            dec.feed(t)
        results[name] = (time.perf_counter() - t0) / args.tokens * 1e3
    print(f"| sampler (vocab {N_VOCAB}) | ms / token (sample + detokenize) |\n|---|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling_overhead.json").write_text(json.dumps(
        {"n_vocab": N_VOCAB, "tokens": args.tokens, "ms_per_token": results}, indent=2))


if __name__ == "__main__":
    main()
