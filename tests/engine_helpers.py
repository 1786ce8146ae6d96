"""Shared pieces of the engine tests: tiny checkpoints converted to GGUF, the reference's
logits, and a GGUF rewriter that makes deliberately broken or perturbed copies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

import gguf

# tiny-12 (spec §12): W = 16, layers M S M S M S M* G U X U X
N_CTX = 256

# SAMBAY_TEST_DEVICE picks the device every engine test's model is placed on, all layers there:
# "cpu", "cuda" (the first CUDA device) or a ggml device name such as "MTL0". Unset: the
# engine's own default ("auto"). conftest.py applies it through use_test_device().
TEST_DEVICE = os.environ.get("SAMBAY_TEST_DEVICE", "").strip()
_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA0"}


def selected_device() -> Optional[str]:
    """The ggml device name SAMBAY_TEST_DEVICE selects, or None when it is unset."""
    if not TEST_DEVICE:
        return None
    return _DEVICE_NAMES.get(TEST_DEVICE.lower(), TEST_DEVICE)


def selected_device_is_gpu() -> bool:
    """Whether the engine tests run on a GPU (SAMBAY_TEST_DEVICE names one)."""
    name = selected_device()
    return name is not None and name != "CPU"


def use_test_device() -> None:
    """Makes every ``sambay.engine.Model`` made with the default device (``"auto"``, which
    ``Llama`` passes on too) load on SAMBAY_TEST_DEVICE with every layer there, and checks
    that it did: a model that silently stayed on another device fails its test. Models a
    test places explicitly (``device="cpu"``) keep their device."""
    name = selected_device()
    if name is None:
        return
    from sambay import engine

    original = engine.Model.__init__

    def init(self: Any, path: Any, *, device: str = "auto", n_gpu_layers: int = -1, **kw: Any) -> None:
        if device != "auto":
            original(self, path, device=device, n_gpu_layers=n_gpu_layers, **kw)
            return
        original(self, path, device=name, n_gpu_layers=-1, **kw)
        if self.device.lower() != name.lower():
            raise RuntimeError(f"SAMBAY_TEST_DEVICE={TEST_DEVICE}: the model runs on {self.device}, not {name}")

    engine.Model.__init__ = init  # type: ignore[method-assign]


def make_gguf(root: Path, config: str, outtype: str, *, dtype: str = "float32", seed: int = 0) -> tuple[Path, Path]:
    """Writes a random HF checkpoint and converts it; returns (hf_dir, gguf_path)."""
    from sambay.convert import convert, tiny

    hf_dir = root / f"{config}-{dtype}-s{seed}"
    if not (hf_dir / "config.json").exists():
        tiny.write_checkpoint(hf_dir, config, seed=seed, dtype=dtype)
    out = root / f"{config}-{dtype}-s{seed}-{outtype}.gguf"
    if not out.exists():
        convert(hf_dir, out, outtype=outtype, progress=False)
    return hf_dir, out


def reference_logits(ref: Any, ids: Iterable[int]) -> np.ndarray:
    """All-position logits of the reference (tests/numpy_reference.py), float64 [T, vocab]."""
    return ref.forward(list(int(i) for i in ids))


def _field_value(field: Any) -> tuple[Any, gguf.GGUFValueType, Optional[gguf.GGUFValueType]]:
    vtype = field.types[0]
    sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
    return field.contents(), vtype, sub


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    arch: Optional[str] = None,
    set_kv: Optional[dict[str, Callable[[Any], Any]]] = None,
    drop_kv: Iterable[str] = (),
    drop_tensors: Iterable[str] = (),
    tensor_fn: Optional[dict[str, Callable[[np.ndarray], np.ndarray]]] = None,
) -> Path:
    """Copies an F32 GGUF, changing metadata values (functions of the old value), dropping keys
    or tensors, or transforming tensor data (numpy order; the shape may change)."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch or old_arch)
    set_kv = set_kv or {}
    drop_kv = set(drop_kv)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_kv:
            continue
        value, vtype, sub = _field_value(field)
        if name in set_kv:
            value = set_kv[name](value)
        if arch and name.startswith(old_arch + "."):
            name = arch + name[len(old_arch):]
        writer.add_key_value(name, value, vtype, sub_type=sub)
    drop_tensors = set(drop_tensors)
    tensor_fn = tensor_fn or {}
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, "rewrite_gguf handles F32 files only"
        data = np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if t.name in tensor_fn:
            data = np.ascontiguousarray(tensor_fn[t.name](data), dtype=np.float32)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def three_sequences(ctx: Any, n_vocab: int, *, seed: int, n_steps: int, n_batch: int
                    ) -> tuple[dict[int, np.ndarray], dict[int, list[int]], list[list[int]]]:
    """Three sequences of one context (slots 0-2; prompts of 3, 21 and 40 random tokens) fed
    together in n_batch chunks, then n_steps decode steps of all three. Returns slot -> logits
    rows (the last row of each prompt chunk, then one row per step), the prompts, the steps."""
    rng = np.random.default_rng(seed)
    prompts = {s: rng.integers(0, n_vocab, n).tolist() for s, n in enumerate((3, 21, 40))}
    steps = rng.integers(0, n_vocab, (n_steps, 3)).tolist()
    out: dict[int, list[np.ndarray]] = {s: [] for s in prompts}
    done = {s: 0 for s in prompts}
    while any(done[s] < len(p) for s, p in prompts.items()):
        batch = [(s, p[done[s]:done[s] + n_batch]) for s, p in prompts.items() if done[s] < len(p)]
        for (s, toks), row in zip(batch, ctx.decode(batch)):
            out[s].append(row)
            done[s] += len(toks)
    for row in steps:
        logits = ctx.decode([(s, [row[s]]) for s in prompts])
        for s in prompts:
            out[s].append(logits[s])
    return {s: np.stack(v) for s, v in out.items()}, prompts, steps
