"""What the benchmarks share: the scaled-down model shape and the commit they ran on."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The scaled-down shape every speed benchmark uses (HF config keys; SambaY adds its window).
MEDIUM_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
}


def git_commit() -> str:
    """The short hash of the checkout the benchmark runs from, or "unknown"."""
    try:
        return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                       text=True).strip()
    except Exception:
        return "unknown"


def best_run(runs: list[dict], key: str) -> dict:
    """The run with the highest ``key`` (a speed) of several runs of one measurement (the
    machine's speed drifts with its neighbours), with every run's ``key`` under ``runs``; the
    last run (its error) if none has it."""
    ok = [r for r in runs if key in r]
    best = max(ok, key=lambda r: r[key]) if ok else runs[-1]
    return {**best, "runs": [r.get(key) for r in runs]} if len(runs) > 1 else best
