"""``sambay serve --ray`` on this machine: the ingress overhead per token, aggregate tokens/s
with 1 and 2 replicas, and the time to move a conversation's state between replicas against
evaluating its tokens again (on the tests' tiny checkpoint and at the real shape at 32K).

    python -m bench.ray_serve [--model PATH] [--n-ctx 4096] [--history 3000] [--repeats 5]
                              [--real PATH --depth 32768 --prefill 512]

Starts a local Ray cluster (2 CPUs) with 2 replicas of one slot each, and ``sambay serve`` in
this process with the same settings. Overhead: the seconds per streamed token (after the first)
through the Ray ingress minus through the local server, same request at temperature 0.
Aggregate: ``--streams`` concurrent streams through the ingress, alternating between 1 replica
of 1 thread, 2 replicas of 1 thread and 1 replica of 2 threads (2 slots each). Handoff: a
conversation of ``--history`` tokens is moved (save_state -> object store -> load_state)
between the replicas, against one replica-sized context evaluating those tokens.

With ``--real`` (a GGUF of the real model shape): two Ray actors each hold a context of that
model; one is put at ``--depth`` positions with a state of the real size (zero-filled values,
bench/depth_fill.py: no real prefill of that many tokens) and the state moves between them by
the steps of ``move()`` (save_state, the object store, load_state). Against that: the prefill
speed over ``--prefill`` tokens (synthetic ids) on 2 threads, extrapolated linearly to ``--depth`` (an
underestimate of a real prefill, whose attention cost grows with depth). Reports only (no
asserts): prints a summary and writes bench/results/ray_serve.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def aggregate(url: str, streams: int, n: int, eos: int) -> float:
    """Tokens/s of ``streams`` concurrent streams of ``n`` tokens each (EOS banned)."""
    def one(i: int) -> int:
        body = {"model": "m", "prompt": f"{i}+34=", "max_tokens": n, "temperature": 0,
                "logit_bias": {str(eos): -100}, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            return sum(line.startswith("data: {") for line in r.iter_lines())

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(streams)))
    if total < streams * n:
        raise RuntimeError(f"{url}: {total} chunks for {streams} x {n} tokens")
    return total / (time.perf_counter() - t0)


@ray.remote(num_cpus=1)
class _Holder:
    """A context of the real model in its own process, as a replica's slot would hold it."""

    def __init__(self, model: str, n_ctx: int, threads: int) -> None:
        from sambay.engine import Context, Model

        self.model = Model(model)
        self.ctx = Context(self.model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads)

    def fill(self, depth: int) -> int:
        """Puts the context at ``depth`` positions (real-size state, zero values); its bytes."""
        from bench.depth_fill import check_sambay, sambay_state

        self.ctx.reset()
        self.ctx.eval(list(range(100, 108)))
        real = self.ctx.save_state()
        check_sambay(real, self.model.hparams())
        self.ctx.load_state(sambay_state(real, self.model.hparams(), depth).tobytes())
        return self.ctx.n_past

    def save(self) -> bytes:
        return self.ctx.save_state()

    def load(self, state: bytes) -> int:
        self.ctx.load_state(state)
        return self.ctx.n_past

    def prefill(self, n: int) -> float:
        """Seconds to evaluate ``n`` tokens from an empty context."""
        self.ctx.reset()
        toks = [(7 * i + 11) % self.model.n_vocab for i in range(n)]
        t0 = time.perf_counter()
        self.ctx.eval(toks)
        return time.perf_counter() - t0


def real_handoff(model: str, depth: int, n_prefill: int, repeats: int) -> dict[str, Any]:
    """Moving a ``depth``-position state of ``model`` between two actors vs prefilling it again."""
    a, b = (_Holder.remote(model, depth + 64, 2) for _ in range(2))
    assert ray.get(a.fill.remote(depth)) == depth
    moves = []
    src, dst = a, b
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert ray.get(dst.load.remote(src.save.remote())) == depth  # the ref goes actor to actor
        moves.append(time.perf_counter() - t0)
        src, dst = dst, src
    size = len(ray.get(a.save.remote()))
    ray.get(a.prefill.remote(16))  # warm: graphs built
    prefill = [ray.get(a.prefill.remote(n_prefill)) for _ in range(max(2, repeats // 2))]
    per_token = [t / n_prefill for t in prefill]
    for h in (a, b):
        ray.kill(h)
    return {"model": Path(model).name, "depth": depth, "state_mib": size / 2**20, "move_s": stats(moves),
            "prefill_tokens": n_prefill, "prefill_threads": 2,
            "prefill_tok_s": stats([1 / t for t in per_token]),
            "reprefill_s_extrapolated": stats([t * depth for t in per_token])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="GGUF file (default: the tests' seeded tiny checkpoint, whose random weights never stop early)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--history", type=int, default=3000, help="tokens of the moved conversation")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per overhead stream")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--streams", type=int, default=4, help="concurrent streams for the aggregate tokens/s")
    ap.add_argument("--real", default=None, help="GGUF of the real shape for the handoff at --depth")
    ap.add_argument("--depth", type=int, default=32768)
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the prefill-speed measurement")
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

        # aggregate tokens/s (2 slots per replica), side by side, alternating: 1 replica of 1
        # thread, 2 replicas of 1 thread, 1 replica of 2 threads (the same 2 cores as 2 replicas)
        serve.delete(APP_NAME)
        configs = {"1_replica": (1, 1), "2_replicas": (2, 1), "1_replica_2_threads": (1, 2)}
        urls = {name: f"{ray_url}/{name}" for name in configs}
        for name, (n, threads) in configs.items():
            serve.run(build_app(model, replicas=n, replica_cpus=0.5,
                                **dict(kw, parallel=2, n_threads=threads, n_threads_batch=threads)),
                      name=name, route_prefix=f"/{name}")
            aggregate(urls[name], args.streams, 8, eos)  # warm
        agg: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name in configs:
                agg[name].append(aggregate(urls[name], args.streams, args.tokens, eos))
        serve.shutdown()
        real = real_handoff(args.real, args.depth, args.prefill, args.repeats) if args.real else None
    finally:
        serve.shutdown()
        ray.shutdown()
        local.should_exit = True

    result = {"commit": git_commit(), "model": Path(model).name, "n_ctx": args.n_ctx, "threads": 1,
              "local_s_per_token": stats(local_s), "ray_s_per_token": stats(ray_s),
              "overhead_ms_per_token": stats([1e3 * (r - lo) for r, lo in zip(ray_s, local_s)]),
              "history_tokens": len(ids), "state_mib": state_bytes / 2**20,
              "move_s": stats([m["seconds"] for m in moves]), "prefill_s": stats(prefill),
              "streams": args.streams, "aggregate_tok_s": {name: stats(v) for name, v in agg.items()},
              "real_handoff": real}
    out = Path(__file__).parent / "results" / "ray_serve.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    o, m, p = result["overhead_ms_per_token"], result["move_s"], result["prefill_s"]
    print(f"per token: local {1e3 * result['local_s_per_token']['mean']:.2f} ms, Ray ingress "
          f"{1e3 * result['ray_s_per_token']['mean']:.2f} ms: overhead {o['mean']:.2f} ± {o['sd']:.2f} ms")
    print(f"state of {len(ids)} tokens ({result['state_mib']:.1f} MiB): move {1e3 * m['mean']:.1f} ± "
          f"{1e3 * m['sd']:.1f} ms, re-prefill {1e3 * p['mean']:.1f} ± {1e3 * p['sd']:.1f} ms")
    for n, a in result["aggregate_tok_s"].items():
        print(f"{args.streams} streams, {n}: {a['mean']:.1f} ± {a['sd']:.1f} tok/s")
    if real is not None:
        m, r = real["move_s"], real["reprefill_s_extrapolated"]
        print(f"{real['model']} at {real['depth']} ({real['state_mib']:.0f} MiB): move {m['mean']:.2f} ± {m['sd']:.2f} s, "
              f"re-prefill {r['mean']:.0f} ± {r['sd']:.0f} s (extrapolated from {real['prefill_tokens']} tokens at "
              f"{real['prefill_tok_s']['mean']:.1f} tok/s)")


if __name__ == "__main__":
    main()
