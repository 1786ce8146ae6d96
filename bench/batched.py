"""Many sequences at once: aggregate decode speed against the number of sequences, sambay
against llama.cpp's transformer twin, in one run on one machine with the same threads.

    python -m bench.batched [--quick | --full] [--types Q4_0,Q4_K_M] [--depths 512,8192]
                            [--seqs 1,2,4,8,16,32] [--budget-gib 8] [--workdir DIR]

Per engine, weight type, context depth D and number of sequences S (each measurement in its
own subprocess):

* aggregate decode tok/s: S sequences, each at depth D (put there by loading a filled state
  into every sequence, ``bench/depth_fill.py``), decode ``--gen`` steps of one token per
  sequence, every step one engine call with all S (sambay: ``Context.decode`` of S
  ``(seq, [token])`` pairs; llama.cpp: one ``llama_batch`` with S sequence ids, as its
  ``batched-bench`` does, each sequence in its own KV stream);
* each engine's prefill tok/s of a 512-token prompt, the compute bound its aggregate approaches;
* the fixed-memory scenario of the model card: with ``--budget-gib`` for weights + caches at
  32K context per sequence, how many sequences each engine holds, and the aggregate decode
  speed each reaches with that many at depth 32K (sambay's count is capped by ``--max-seqs``;
  the cap is reported).

The model files are the ones ``bench/peers.py`` makes (same shapes and quantizers, shared
``--workdir``). Results: ``bench/results/batched_<mode>.json``/``.md``/``.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, best_run, git_commit
from bench.peers import MODES, _machine, _run, _tokens, prepare

CTX_32K = 32768
FILL_TOKENS = 16


def _worker_sambay(a: argparse.Namespace) -> dict:
    from bench.depth_fill import sambay_state
    from sambay.engine import Context, Model

    model = Model(a.model)
    S, D = a.n_seq, a.depth
    n_ctx = D + a.gen + 8
    th = dict(n_threads=a.threads, n_threads_batch=a.threads)
    out: dict[str, Any] = {}
    one = Context(model, n_ctx=max(n_ctx, 600), **th)
    if a.prefill:
        toks = _tokens(512, model.n_vocab, 3)
        one.eval(toks[:8])
        one.reset()
        t = time.perf_counter()
        one.eval(toks)
        out["prefill_tok_s"] = 512 / (time.perf_counter() - t)
        one.reset()
    one.eval(_tokens(FILL_TOKENS, model.n_vocab, 2))
    state = sambay_state(one.save_state(), model.hparams(), D).tobytes()
    del one
    ctx = Context(model, n_ctx=n_ctx, n_batch=max(512, S), n_seq_max=S, **th)
    for s in range(S):
        ctx.load_state(state, seq=s)
    gen = _tokens(a.gen + 1, model.n_vocab, 1)
    ctx.decode([(s, [gen[0]]) for s in range(S)])  # warm-up step
    t = time.perf_counter()
    for tok in gen[1:]:
        ctx.decode([(s, [tok]) for s in range(S)])
    dt = time.perf_counter() - t
    out["decode_tok_s"] = S * a.gen / dt
    out["step_ms"] = 1000 * dt / a.gen
    mem = ctx.memory_breakdown()
    out["per_seq_bytes_at_32k"] = _sambay_per_seq(mem, n_ctx)
    out["memory_breakdown"] = mem
    out["weights_bytes"] = model.weights_bytes
    return out


def _sambay_per_seq(mem: dict, n_ctx: int) -> int:
    """One sequence's caches at 32K context: the fixed parts as allocated, the shared KV
    scaled from n_ctx cells to 32K."""
    n = mem["n_seq_max"]
    fixed = (mem["mamba_conv"] + mem["mamba_ssm"] + mem["swa_kv"]) // n
    return int(fixed + mem["full_kv"] // n * CTX_32K / n_ctx)


def _worker_llamacpp(a: argparse.Namespace) -> dict:
    import llama_cpp as L

    from bench.depth_fill import llamacpp_state

    S, D = a.n_seq, a.depth
    per_seq = D + a.gen + 8
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    if a.no_extra_bufts:
        # ggml's AMX matmul (a native build on an AMX CPU) crashes on batches of several rows;
        # without extra buffer types the CPU's plain kernels run (no AMX, no repacking)
        mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = per_seq * S
    cp.n_batch = cp.n_ubatch = max(512, S)
    cp.n_seq_max = S
    cp.n_threads = cp.n_threads_batch = a.threads
    out: dict[str, Any] = {"llama_cpp_python": L.__version__, "extra_bufts": not a.no_extra_bufts}
    if hasattr(cp, "flash_attn_type"):
        cp.flash_attn_type = 0  # off, as sambay's default (and bench/peers.py's runs)
        out["flash_attn"] = False
    # a KV stream per sequence (llama.cpp's default: each sequence attends to its own cells, as
    # sambay's do) unless --llamacpp-unified (one buffer for all: every sequence's attention
    # spans every sequence's cells, masked); a llama-cpp-python without the field has only that
    unified = a.llamacpp_unified or not hasattr(cp, "kv_unified")
    if hasattr(cp, "kv_unified"):
        cp.kv_unified = unified
    out["kv_unified"] = unified
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(max(S, FILL_TOKENS, 512), 0, 1)

    def run(ctx: Any, entries: list[tuple[int, int, int]], last_logits_only: bool = False) -> None:  # (seq, pos, token)
        batch.n_tokens = len(entries)
        for i, (s, pos, tok) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = s
            batch.logits[i] = 0 if last_logits_only and i < len(entries) - 1 else 1
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    if a.prefill:
        # the twin's own compute bound, timed as sambay's: a 512-token prompt after a warm-up
        pp = L.llama_context_default_params()
        pp.n_ctx, pp.n_batch, pp.n_ubatch, pp.n_seq_max = 600, 512, 512, 1
        pp.n_threads = pp.n_threads_batch = a.threads
        if hasattr(pp, "flash_attn_type"):
            pp.flash_attn_type = 0
        pctx = L.llama_init_from_model(model, pp)
        toks = _tokens(512, n_vocab, 3)
        run(pctx, [(0, p, t) for p, t in enumerate(toks[:8])], last_logits_only=True)
        L.llama_memory_clear(L.llama_get_memory(pctx), True)
        t0 = time.perf_counter()
        run(pctx, [(0, p, t) for p, t in enumerate(toks)], last_logits_only=True)
        out["prefill_tok_s"] = 512 / (time.perf_counter() - t0)
        L.llama_free(pctx)

    # a real one-sequence state to fill from, made in a one-sequence context (one KV stream)
    one_p = L.llama_context_default_params()
    one_p.n_ctx, one_p.n_seq_max, one_p.n_threads, one_p.n_threads_batch = 256, 1, a.threads, a.threads
    if hasattr(one_p, "flash_attn_type"):
        one_p.flash_attn_type = 0
    one = L.llama_init_from_model(model, one_p)
    fill = _tokens(FILL_TOKENS, n_vocab, 2)
    for p, t in enumerate(fill):  # one token per call (ggml's AMX matmul crashes on batches here)
        run(one, [(0, p, t)])
    size = L.llama_state_seq_get_size(one, 0)
    buf = (ctypes.c_uint8 * size)()
    L.llama_state_seq_get_data(one, buf, size, 0)
    L.llama_free(one)
    fake = llamacpp_state(bytes(buf), D, n_stream=1 if unified else S)
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not create the context")
    mem = L.llama_get_memory(ctx)
    ptr = fake.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    for s in range(S):
        if L.llama_state_seq_set_data(ctx, ptr, fake.nbytes, s) != fake.nbytes:
            raise RuntimeError(f"llama_state_seq_set_data refused the filled state for sequence {s}")
        if L.llama_memory_seq_pos_max(mem, s) != D - 1:
            raise RuntimeError(f"sequence {s} is not at depth {D}")
    del fake
    gen = _tokens(a.gen + 1, n_vocab, 1)
    run(ctx, [(s, D, gen[0]) for s in range(S)])  # warm-up step
    t = time.perf_counter()
    for i, tok in enumerate(gen[1:]):
        run(ctx, [(s, D + 1 + i, tok) for s in range(S)])
    dt = time.perf_counter() - t
    out["decode_tok_s"] = S * a.gen / dt
    out["step_ms"] = 1000 * dt / a.gen
    cfg = a.shape
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    out["per_seq_bytes_at_32k"] = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * CTX_32K * 2
    out["weights_bytes"] = int(L.llama_model_size(model))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def _measure(engine: str, model: Path, S: int, D: int, a: argparse.Namespace, shape: dict,
             prefill: bool = False) -> dict:
    cmd = ["bench.batched", "--worker", engine, "--model", str(model), "--n-seq", str(S), "--depth", str(D),
           "--threads", str(a.threads), "--gen", str(a.gen), "--shape", json.dumps(shape)]
    if prefill:
        cmd.append("--prefill")
    if a.no_extra_bufts:
        cmd.append("--llamacpp-no-extra-bufts")
    if a.llamacpp_unified:
        cmd.append("--llamacpp-unified")
    t0 = time.perf_counter()
    r = _run(cmd, a, timeout=a.timeout)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


def _cell(r: dict) -> str:
    """tok/s of the best run, and the range of all runs where there were several."""
    runs = [x for x in r.get("runs", []) if x]
    rng = f" ({min(runs):.1f}–{max(runs):.1f})" if len(runs) > 1 else ""
    return f"{r['decode_tok_s']:.1f}{rng}"


def report(res: dict) -> str:
    lines = [f"# Many sequences at once ({res['mode']})", "",
             f"Machine: {res['machine']}; {res['threads']} threads for each engine; commit {res['commit']}. "
             "Aggregate decode tok/s of S sequences, each at depth D, one token per sequence per step"
             + (f"; the best of {res['repeat']} runs, the engines alternating (the range of the runs in "
                "parentheses)" if res.get("repeat", 1) > 1 else "") + ".", ""]
    layouts = {r.get("llamacpp", {}).get("kv_unified") for by_d in res["sweep"].values() for rows in by_d.values()
               for r in rows.values()} - {None}
    if layouts:
        lines += ["llama.cpp's KV cache: " + " and ".join(
            "one buffer for all sequences (each sequence's attention spans every sequence's cells)" if u
            else "a stream per sequence (each sequence attends to its own cells)" for u in sorted(layouts)) + ".", ""]
    if res.get("notes"):
        lines += [res["notes"], ""]
    for qt, by_depth in res["sweep"].items():
        for D, rows in by_depth.items():
            lines += [f"## {qt}, depth {D}", "",
                      "| sequences | sambay tok/s | llama.cpp twin tok/s | ratio | sambay step ms |",
                      "|---|---|---|---|---|"]
            for S, r in rows.items():
                sb, lc = r.get("sambay", {}), r.get("llamacpp", {})
                a, b = sb.get("decode_tok_s"), lc.get("decode_tok_s")
                ratio = f"{a / b:.2f}x" if a and b else "-"
                fa = _cell(sb) if a else "-"
                fb = _cell(lc) if b else "not measured"
                lines.append(f"| {S} | {fa} | {fb} | {ratio} | {sb.get('step_ms', 0):.1f} |")
            lines.append("")
            for eng, key, name in (("sambay", "prefill", "sambay"), ("llamacpp", "prefill_llamacpp", "llama.cpp twin")):
                pre = res.get(key, {}).get(qt)
                one = rows.get("1", {}).get(eng, {}).get("decode_tok_s")
                by_s = {S: r.get(eng, {}).get("decode_tok_s") or 0 for S, r in rows.items()}
                if pre and one:
                    best = max(by_s.values())
                    at = "; ".join(f"{S} sequences {v / pre:.0%}" for S, v in by_s.items() if S in ("8", "16") and v)
                    eight = f" ({by_s['8'] / one:.2f}x with 8)" if by_s.get("8") else ""
                    lines.append(f"- {name}: prefill (512 tokens) {pre:.1f} tok/s; best aggregate decode {best:.1f} "
                                 f"tok/s = {best / pre:.0%} of it{f' ({at})' if at else ''}, {best / one:.2f}x its "
                                 f"single-sequence decode{eight}")
            lines.append("")
    for qt, b in res.get("budget", {}).items():
        lines += [f"## Fixed memory budget, {qt}: {res['budget_gib']} GiB for weights + caches, 32K context per sequence", "",
                  "| engine | bytes per sequence at 32K | sequences held | measured with | aggregate tok/s at depth 32K |",
                  "|---|---|---|---|---|"]
        for eng in ("sambay", "llamacpp"):
            e = b.get(eng)
            if not e:
                continue
            tok_s = _cell(e) if e.get("decode_tok_s") else "-"
            lines.append(f"| {eng} | {e['per_seq_mib']:.0f} MiB | {e['fits']} | {e['measured_seqs']} | {tok_s} |")
        s, l_ = b.get("sambay", {}).get("decode_tok_s"), b.get("llamacpp", {}).get("decode_tok_s")
        if s and l_:
            lines += ["", f"sambay / twin aggregate: {s / l_:.2f}x"]
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for qt, by_depth in res["sweep"].items():
        for D, rows in by_depth.items():
            for eng, style in (("sambay", "-o"), ("llamacpp", "--s")):
                pts = [(int(S), r[eng]["decode_tok_s"]) for S, r in rows.items() if r.get(eng, {}).get("decode_tok_s")]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{'sambay' if eng == 'sambay' else 'llama.cpp twin'} {qt} @ {D}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title(f"Many sequences at once ({res['mode']}, {res['threads']} threads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="scaled-down shape (the default)")
    mode.add_argument("--full", action="store_true", help="the real model sizes")
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--depths", default="512,8192")
    ap.add_argument("--seqs", default="1,2,4,8,16,32")
    ap.add_argument("--engines", default="sambay,llamacpp")
    ap.add_argument("--budget-gib", type=float, default=8.0)
    ap.add_argument("--max-seqs", type=int, default=64, help="cap on sambay's sequences in the budget scenario")
    ap.add_argument("--no-budget", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="measure each cell this many times, keep the best")
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--llamacpp-no-extra-bufts", dest="no_extra_bufts", action="store_true",
                    help="llama.cpp without extra buffer types (AMX, repacking): its native build's AMX "
                         "matmul crashes on batches on AMX CPUs")
    ap.add_argument("--llamacpp-unified", action="store_true",
                    help="llama.cpp with one KV buffer for all sequences instead of a stream per sequence")
    ap.add_argument("--report-only", action="store_true", help="redraw the markdown and plot from the JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--n-seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--prefill", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.shape = json.loads(a.shape) if a.shape else {}
        res = {"sambay": _worker_sambay, "llamacpp": _worker_llamacpp}[a.worker](a)
        print("RESULT " + json.dumps(res), flush=True)
        return

    m = "full" if a.full else "quick"
    if a.report_only:
        out = Path(a.out)
        res = json.loads((out / f"batched_{m}.json").read_text())
        (out / f"batched_{m}.md").write_text(report(res) + "\n")
        plot(res, out / f"batched_{m}.png")
        print(report(res))
        return
    types = a.types.split(",")
    engines = a.engines.split(",")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sambay-batched-"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(m, work, types, engines)
    twin_shape = MODES[m]["twin"] or {}
    res: dict[str, Any] = {"mode": m, "machine": _machine(), "threads": a.threads, "commit": git_commit(),
                           "gen": a.gen, "repeat": a.repeat, "budget_gib": a.budget_gib, "sweep": {}, "prefill": {},
                           "prefill_llamacpp": {},
                           "budget": {}}
    depths = [int(x) for x in a.depths.split(",")]
    for qt in types:
        res["sweep"][qt] = {}
        for D in depths:
            rows: dict[str, dict] = {}
            for S in (int(x) for x in a.seqs.split(",")):
                runs: dict[str, list[dict]] = {eng: [] for eng in engines}
                for _ in range(a.repeat):  # the engines alternate, so a drift reaches both
                    for eng in engines:
                        # each engine's 512-token prefill (its compute bound; the depth does not
                        # enter it) with its one-sequence runs at the first depth
                        r = _measure(eng, files[f"{eng}/{qt}"], S, D, a, twin_shape,
                                     prefill=S == 1 and D == depths[0])
                        if "prefill_tok_s" in r:
                            key = "prefill" if eng == "sambay" else "prefill_llamacpp"
                            res[key][qt] = max(r["prefill_tok_s"], res[key].get(qt, 0.0))
                        runs[eng].append(r)
                        print(f"{qt} depth {D} S={S} {eng}: {r.get('decode_tok_s', r.get('error'))}", flush=True)
                rows[str(S)] = {eng: best_run(rs, "decode_tok_s") for eng, rs in runs.items()}
            res["sweep"][qt][str(D)] = rows
        if not a.no_budget:
            b: dict[str, Any] = {}
            budget = a.budget_gib * 2**30
            for eng in engines:
                probe = res["sweep"][qt][str(depths[0])]["1"].get(eng, {})
                if "per_seq_bytes_at_32k" not in probe:
                    continue
                per, w = probe["per_seq_bytes_at_32k"], probe["weights_bytes"]
                compute = probe.get("memory_breakdown", {}).get("compute", 0)
                fits = int((budget - w - compute) // per)
                n = min(fits, a.max_seqs) if eng == "sambay" else fits
                e = {"per_seq_mib": per / 2**20, "fits": fits, "measured_seqs": n}
                if n >= 1:
                    r = best_run([_measure(eng, files[f"{eng}/{qt}"], n, CTX_32K, a, twin_shape)
                                  for _ in range(a.repeat)], "decode_tok_s")
                    e.update({k: r[k] for k in ("decode_tok_s", "step_ms", "error", "runs") if k in r})
                print(f"{qt} budget {eng}: {e}", flush=True)
                b[eng] = e
            res["budget"][qt] = b
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    old = out / f"batched_{m}.json"
    if old.exists():  # results of other types stay (a run can be done type by type)
        prev = json.loads(old.read_text())
        for key in ("sweep", "prefill", "prefill_llamacpp", "budget"):
            res[key] = {**prev.get(key, {}), **res[key]}
        if prev.get("notes"):
            res["notes"] = prev["notes"]
    old.write_text(json.dumps(res, indent=1) + "\n")
    (out / f"batched_{m}.md").write_text(report(res) + "\n")
    plot(res, out / f"batched_{m}.png")
    print(report(res))


if __name__ == "__main__":
    main()
