"""Train sambay's built-in demo model: a small SambaY that does column arithmetic.

    python -m train.train --out build/demo-train            # the shipped model (defaults)
    python -m train.train --out /tmp/t --steps 200          # a quick calibration run

Steps: train the BPE (train/tokenizer.py) on generated text; initialise a SambaY with the real
layer rule (N layers, mb_per_layer 2: Mamba / SWA below N/2, the memory Mamba at N/2, the single
full-attention layer at N/2+1, then GMU / cross-attention); train it on the seeded synthetic
stream of train/data.py (loss on the assistant turn only) with AdamW; write an HF checkpoint
folder in the real layout (config.json, model.safetensors with the real tensor names,
tokenizer.json, tokenizer_config.json with the Phi-4-mini chat template, generation_config.json)
and convert it to GGUF with sambay's converter.

Everything is seeded (Python, torch); with the same thread count the run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sambay.convert.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, _BASE_CONFIG, _write_safetensors  # noqa: E402

from train import data  # noqa: E402
from train.model import SambaYTrain, init_params  # noqa: E402
from train.tokenizer import train_tokenizer  # noqa: E402


def model_config(args: argparse.Namespace) -> dict:
    """config.json of the demo model: the real keys, small sizes."""
    return {
        **_BASE_CONFIG,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "sliding_window": args.window,
        "max_position_embeddings": 4096,
        "mamba_d_state": args.d_state,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "torch_dtype": "float32",
    }


def encode(tok, problems: list[data.Problem]) -> list[tuple[list[int], int]]:
    """(token ids, index of the first completion token) per problem."""
    full = tok.encode_batch([p.text for p in problems], add_special_tokens=False)
    prompts = tok.encode_batch([p.prompt for p in problems], add_special_tokens=False)
    out = []
    for f, pr in zip(full, prompts):
        ids, n = f.ids, len(pr.ids)
        assert ids[:n] == pr.ids, "prompt tokens must be a prefix of the full text's"
        out.append((ids, n))
    return out


def make_batch(items: list[tuple[list[int], int]], pad_id: int):
    """ids [B, T], targets [B, T] (-100 outside the completion)."""
    T = max(len(ids) for ids, _ in items)
    x = torch.full((len(items), T), pad_id, dtype=torch.long)
    y = torch.full((len(items), T), -100, dtype=torch.long)
    for b, (ids, n) in enumerate(items):
        t = torch.tensor(ids)
        x[b, : len(ids)] = t
        y[b, n - 1 : len(ids) - 1] = t[n:]  # position j predicts token j+1
    return x, y


@torch.no_grad()
def teacher_forced_exact(model, items, pad_id, bs=64) -> float:
    """Share of problems whose whole completion is the argmax at every position: exactly the
    problems greedy decoding would reproduce token for token."""
    good = 0
    for k in range(0, len(items), bs):
        x, y = make_batch(items[k : k + bs], pad_id)
        pred = model(x).argmax(-1)
        ok = ((pred == y) | (y == -100)).all(-1)
        good += int(ok.sum())
    return good / len(items)


def write_hf_folder(out: Path, cfg: dict, tok, tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ids = {content: tok.token_to_id(content) for content, _, _ in SPECIAL_TOKENS}
    eos, end = ids["<|endoftext|>"], ids["<|end|>"]
    cfg = dict(cfg, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": eos, "eos_token_id": [end, eos], "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(ids[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": r,
                             "single_word": False, "special": s} for c, s, r in SPECIAL_TOKENS}
    e = "<|endoftext|>"
    tok_cfg = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
               "added_tokens_decoder": decoder, "bos_token": e, "chat_template": CHAT_TEMPLATE,
               "clean_up_tokenization_spaces": False, "eos_token": e,
               "model_max_length": cfg["max_position_embeddings"], "pad_token": e,
               "tokenizer_class": "GPT2Tokenizer", "unk_token": e}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    names = sorted(tensors)
    entries = [(n, tuple(tensors[n].shape), "F16" if stored_f16(n, tensors[n]) else "F32")
               for n in names]

    def raw(n: str) -> bytes:
        t = tensors[n].float().contiguous()
        return (t.half() if stored_f16(n, t) else t).numpy().tobytes()

    _write_safetensors(out / "model.safetensors", entries, (raw(n) for n in names))


def stored_f16(name: str, t: torch.Tensor) -> bool:
    """The checkpoint stores the matrices in F16 and the vectors and A_log in F32 (like the real
    checkpoint, which keeps A_log and the λ vectors in F32). Every F32 tensor here stays F32 in
    every GGUF the converter writes, so an F16 GGUF of this checkpoint is lossless."""
    return t.ndim >= 2 and not name.endswith("A_log")


def round_to_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights exactly as the checkpoint stores them (F16 rounding where stored F16)."""
    return {n: (t.detach().float().half().float() if stored_f16(n, t) else t.detach().float())
            for n, t in tensors.items()}


def reexport(src: Path, out: Path, outtype: str) -> int:
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from reference_model import load_safetensors_folder
    from sambay.convert import convert

    cfg = json.loads((src / "config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg.pop(k, None)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    final = round_to_checkpoint(load_safetensors_folder(src))
    write_hf_folder(out / "hf", dict(cfg, torch_dtype="float16"), tok, final)
    gguf = out / f"demo-model-{outtype}.gguf"
    convert(out / "hf", gguf, outtype=outtype, progress=False)
    print(f"wrote {out / 'hf'} and {gguf}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (hf/ and demo-model*.gguf)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2800)  # the shipped model's run
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--long-fraction", type=float, default=0.35)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--d-state", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16"])
    ap.add_argument("--from-checkpoint", type=Path, default=None,
                    help="skip training: re-export this HF folder (e.g. an F32 one) the way "
                    "training writes it (F16 matrices) and convert it")
    args = ap.parse_args(argv)
    if args.from_checkpoint is not None:
        return reexport(args.from_checkpoint, Path(args.out), args.outtype)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    tok = train_tokenizer(data.tokenizer_corpus(seed=args.seed + 1), args.vocab)
    pad_id = tok.token_to_id("<|endoftext|>")
    cfg = model_config(args)
    model = SambaYTrain(cfg, init_params(cfg, seed=args.seed))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {tok.get_vocab_size()} ids; model: {n_params / 1e6:.2f} M parameters; "
          f"kinds {[k.name for k in model.cfg.kinds]}", flush=True)

    held = data.held_out_set(60, 60, seed=999)  # progress only; evaluate.py has its own set
    held_short, held_long = encode(tok, held[:60]), encode(tok, held[60:])
    long_tok = [len(ids) for ids, _ in held_long]
    print(f"long-range prompts: {min(long_tok)}-{max(long_tok)} tokens (window {args.window})",
          flush=True)

    decay = [p for n, p in model.p.items() if p.ndim >= 2 and "A_log" not in n]
    other = [p for n, p in model.p.items() if not (p.ndim >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        f = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f)))

    stream = data.training_stream(args.seed, long_fraction=0.0)
    rng = random.Random(args.seed + 2)
    long_rng = random.Random(args.seed + 3)

    def next_batch(long: bool):
        if long:
            probs = [data.make_problem(long_rng, long_range=True, held_out=False)
                     for _ in range(args.batch)]
        else:
            probs = [next(stream) for _ in range(args.batch)]
        return make_batch(encode(tok, probs), pad_id)

    t_train = time.time()
    ema = None
    for step in range(args.steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        x, y = next_batch(rng.random() < args.long_fraction)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            el = time.time() - t_train
            print(f"step {step:5d} loss {ema:.4f} lr {lr_at(step):.2e} "
                  f"{el / (step + 1):.3f}s/step elapsed {el / 60:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            s = teacher_forced_exact(model, held_short, pad_id)
            lg = teacher_forced_exact(model, held_long, pad_id)
            print(f"eval step {step + 1}: exact completion short {s:.3f} long {lg:.3f}", flush=True)

    print(f"training took {(time.time() - t_train) / 60:.1f} min", flush=True)
    hf_dir = out / "hf"
    final = round_to_checkpoint(model.state_dict_hf())
    write_hf_folder(hf_dir, dict(cfg, torch_dtype="float16"), tok, final)
    with torch.no_grad():
        model16 = SambaYTrain(cfg, final)
        s = teacher_forced_exact(model16, held_short, pad_id)
        lg = teacher_forced_exact(model16, held_long, pad_id)
    print(f"as stored (F16 matrices): exact completion short {s:.3f} long {lg:.3f}", flush=True)
    from sambay.convert import convert

    gguf = out / f"demo-model-{args.outtype}.gguf"
    convert(hf_dir, gguf, outtype=args.outtype, progress=False)
    print(f"wrote {hf_dir} and {gguf} ({gguf.stat().st_size / 2**20:.2f} MiB); "
          f"total {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
