"""Per-token cost of a structured-output constraint (llguidance) at the real vocabulary size
(200064), against a decode step.

    python -m bench.structured_overhead [--tokens 300]

Generates a JSON Schema-valid text token by token with a synthetic 200064-token byte-level
vocabulary (:func:`bench.sampling_overhead.synthetic_tokenizer`), timing what the constraint
adds per token: llguidance's mask, the mask applied to the logits
(:func:`sambay.sampling.mask_logits`) and the token passed back to the matcher. The decode step
it is compared with is the fastest one measured at the real size
(``bench/results/peers_full.json``). Target: <= 10% of a decode step. Prints a table and writes
bench/results/structured_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.sampling_overhead import N_VOCAB, synthetic_tokenizer
from sambay.sampling import mask_logits
from sambay.structured import GrammarConstraint, compile_grammar, grammar_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "kind": {"enum": ["person", "robot", "other"]},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace of the Analytical Engine", "age": 36,
            "tags": ["mathematics", "poetry", "notes on the engine", "Bernoulli numbers"] * 3,
            "address": {"city": "London, Marylebone, St James's Square", "zip": "SW1Y 4JH"},
            "kind": "person"}


def fastest_decode_ms(path: Path) -> tuple[float, str]:
    """The shortest decode step measured at the real size, in ms, and what it was."""
    data = json.loads(path.read_text())
    best = min(((1e3 / run["decode_tok_s"], f"{name} @{depth}")
                for name, eng in data["engines"].items() if eng.get("engine") == "sambay"
                for depth, run in eng.get("decode", {}).items() if run.get("decode_tok_s")),
               default=(float("nan"), "none"))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=300, help="tokens to generate (at most the document's)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    tok = synthetic_tokenizer(N_VOCAB)
    t0 = time.perf_counter()
    grammar_tokenizer(tok, N_VOCAB)
    tokenizer_s = time.perf_counter() - t0
    grammar = compile_grammar(json_schema=SCHEMA)
    t0 = time.perf_counter()
    c = GrammarConstraint(grammar, tok, N_VOCAB)
    matcher_ms = (time.perf_counter() - t0) * 1e3
    ids = tok.encode(json.dumps(DOCUMENT))[: args.tokens]
    logits = np.random.default_rng(0).standard_normal(N_VOCAB).astype(np.float32)
    t_mask = t_apply = t_accept = 0.0
    for t in ids:
        a = time.perf_counter()
        bits = c.bitmask()
        b = time.perf_counter()
        masked = mask_logits(logits, bits)
        d = time.perf_counter()
        assert np.isfinite(masked[t]), "the document's token was masked out"
        e = time.perf_counter()
        c.accept(t)
        f = time.perf_counter()
        t_mask, t_apply, t_accept = t_mask + b - a, t_apply + d - b, t_accept + f - e
    n = len(ids)
    per = {"llguidance mask": t_mask / n * 1e3, "apply to logits": t_apply / n * 1e3,
           "accept token": t_accept / n * 1e3}
    total = sum(per.values())
    step_ms, step_what = fastest_decode_ms(Path("bench/results/peers_full.json"))
    print(f"| constraint (JSON Schema, vocab {N_VOCAB}, {n} tokens) | ms / token |\n|---|---:|")
    for name, ms in per.items():
        print(f"| {name} | {ms:.3f} |")
    print(f"| total | {total:.3f} |")
    print(f"\nfastest decode step measured ({step_what}): {step_ms:.1f} ms -> the constraint costs "
          f"{100 * total / step_ms:.1f}% of it")
    print(f"one-off: llguidance tokenizer {tokenizer_s:.2f} s (once per tokenizer), matcher {matcher_ms:.1f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured_overhead.json").write_text(json.dumps(
        {"n_vocab": N_VOCAB, "tokens": n, "ms_per_token": per, "total_ms": total,
         "decode_step_ms": step_ms, "decode_step": step_what, "fraction_of_decode_step": total / step_ms,
         "tokenizer_s": tokenizer_s, "matcher_ms": matcher_ms}, indent=2))


if __name__ == "__main__":
    main()
