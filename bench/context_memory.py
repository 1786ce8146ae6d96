"""What a long context costs: the engine's own ``memory_breakdown()`` at the real width.

    python -m bench.context_memory [--ctx 4096,32768,65536,131072]

Builds a random 8-layer checkpoint of Phi-4-mini-flash-reasoning's width (2560 wide, 40/20
heads, window 512, d_inner 5120; a small FFN and vocabulary) and creates contexts without
evaluating anything. The shared full-attention KV and the compute buffer do not depend on the
layer count; the sliding-window rings and the Mamba states are per layer (the real model has 8
SWA layers instead of 2 and 9 Mamba layers instead of 3). Prints MiB per part, with and without flash attention.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sambay.convert import convert, tiny
from sambay.engine import Context, Model

REAL_WIDTH = {"hidden_size": 2560, "num_attention_heads": 40, "num_key_value_heads": 20,
              "sliding_window": 512, "mamba_d_state": 16, "num_hidden_layers": 8, "intermediate_size": 256,
              "vocab_size": 1024, "max_position_embeddings": 262144}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", default="4096,32768,65536,131072")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck = tiny.write_checkpoint(Path(tmp) / "ck", "tiny-8", overrides=REAL_WIDTH, dtype="bfloat16")
        model = Model(str(convert(ck, Path(tmp) / "m.gguf", outtype="f16", progress=False)), device="cpu")
        for flash in (False, True):
            for n_ctx in (int(x) for x in args.ctx.split(",")):
                ctx = Context(model, n_ctx=n_ctx, n_batch=512, n_threads=1, flash_attn=flash)
                parts = {k: v / 2**20 for k, v in ctx.memory_breakdown().items() if k != "weights"}
                print(f"flash_attn={flash!s:5} n_ctx={n_ctx:6}  " +
                      "  ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items())) + "  (MiB)")
                del ctx


if __name__ == "__main__":
    main()
