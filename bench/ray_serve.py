"""``sambay serve --ray`` on this machine: the ingress overhead per token and the time to move a
conversation's state between replicas against evaluating its tokens again.

    python -m bench.ray_serve [--model PATH] [--n-ctx 4096] [--history 3000] [--repeats 5]

Starts a local Ray cluster (2 CPUs) with 2 replicas of one slot each, and ``sambay serve`` in
this process with the same settings. Overhead: the seconds per streamed token (after the first)
through the Ray ingress minus through the local server, same request at temperature 0. Handoff:
a conversation of ``--history`` tokens is moved (save_state -> object store -> load_state)
between the replicas, against one replica-sized context evaluating those tokens. Reports only
(no asserts): prints a table and writes bench/results/ray_serve.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from sambay.ray_serve import APP_NAME, build_app
from sambay.server.app import create_app, make_server
from sambay.server.pool import SlotLlama, SlotPool

from .common import git_commit


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny() -> str:
    from sambay.convert import convert, tiny

    root = Path(tempfile.mkdtemp(prefix="sambay-bench-"))
    return str(convert(tiny.write_checkpoint(root / "ck", "tiny-12", seed=0), root / "m.gguf", outtype="f32",
                       progress=False))


def per_token(url: str, n: int, eos: int) -> float:
    """Seconds per streamed token after the first, one stream of ``n`` tokens (EOS banned)."""
    body = {"model": "m", "prompt": "12+34=", "max_tokens": n, "temperature": 0, "logit_bias": {str(eos): -100},
            "stream": True}
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    if len(stamps) < n:
        raise RuntimeError(f"{url}: {len(stamps)} chunks for {n} tokens")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="GGUF file (default: the tests' seeded tiny checkpoint, whose random weights never stop early)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--history", type=int, default=3000, help="tokens of the moved conversation")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per overhead stream")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = args.model or _tiny()
    kw: dict[str, Any] = dict(n_ctx=args.n_ctx, parallel=1, max_queue=4, n_threads=1, n_threads_batch=1)

    base = SlotLlama(model, n_ctx=args.n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    local = make_server(create_app(SlotPool([base], max_queue=4), model_alias="m"), log_level="warning")
    threading.Thread(target=local.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not local.started:
        time.sleep(0.02)
    local_url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model, replicas=2, **kw), name=APP_NAME, route_prefix="/")
        ray_url = f"http://127.0.0.1:{port}"
        eos = base.tokenizer.eos_id
        per_token(ray_url, 8, eos), per_token(local_url, 8, eos)  # warm both
        local_s, ray_s = [], []
        for _ in range(args.repeats):
            local_s.append(per_token(local_url, args.tokens, eos))
            ray_s.append(per_token(ray_url, args.tokens, eos))

        # a conversation of --history tokens on one replica, then moved to the other
        words = " ".join(str(i % 97) for i in range(args.history))
        ids = base.tokenize(words)[: args.history]
        httpx.post(ray_url + "/v1/completions", timeout=300, headers={"X-Session-Id": "h"},
                   json={"model": "m", "prompt": ids, "max_tokens": 1, "temperature": 0}).raise_for_status()
        ingress = serve.get_app_handle(APP_NAME)
        moves = [ingress.move.remote("session:h").result(timeout_s=300) for _ in range(args.repeats)]
        prefill = []
        for _ in range(args.repeats):
            base.reset()
            t0 = time.perf_counter()
            base.eval(ids)
            prefill.append(time.perf_counter() - t0)
        state_bytes = len(base.save_state().engine_state)
    finally:
        serve.shutdown()
        ray.shutdown()
        local.should_exit = True

    result = {"commit": git_commit(), "model": Path(model).name, "n_ctx": args.n_ctx, "threads": 1,
              "local_s_per_token": stats(local_s), "ray_s_per_token": stats(ray_s),
              "overhead_ms_per_token": stats([1e3 * (r - lo) for r, lo in zip(ray_s, local_s)]),
              "history_tokens": len(ids), "state_mib": state_bytes / 2**20,
              "move_s": stats([m["seconds"] for m in moves]), "prefill_s": stats(prefill)}
    out = Path(__file__).parent / "results" / "ray_serve.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    o, m, p = result["overhead_ms_per_token"], result["move_s"], result["prefill_s"]
    print(f"per token: local {1e3 * result['local_s_per_token']['mean']:.2f} ms, Ray ingress "
          f"{1e3 * result['ray_s_per_token']['mean']:.2f} ms: overhead {o['mean']:.2f} ± {o['sd']:.2f} ms")
    print(f"state of {len(ids)} tokens ({result['state_mib']:.1f} MiB): move {1e3 * m['mean']:.1f} ± "
          f"{1e3 * m['sd']:.1f} ms, re-prefill {1e3 * p['mean']:.1f} ± {1e3 * p['sd']:.1f} ms")


if __name__ == "__main__":
    main()
