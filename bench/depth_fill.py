"""Put an engine at context depth D without prefilling D tokens, so decode can be timed there.

Decoding one token at depth D costs the same whatever the cached values are: the engine reads
D cached K/V rows per attention layer (and a constant-size state per Mamba layer) however they
were computed. A 32K-token prefill of a 3.8 B model on two CPU threads takes most of an hour
per engine and type, so the benchmark instead writes a saved state of the right size directly
(zero-filled cache rows, positions 0..D-1) and loads it through each engine's own state API:
``Context.load_state`` for sambay, ``llama_state_seq_set_data`` for llama.cpp.

The layout is not guessed: each filler first parses a state the engine saved after a short
real prefill, checks that it accounts for every byte, and keeps that state's headers (types,
row sizes, layer count); only the number of cached positions changes. ``check_*`` rebuilds the
short state at its own depth and compares it with the real one byte for byte in everything but
the cached values.

Zero-filled data pages come from ``np.zeros`` (calloc), so the large buffers cost no resident
memory until the engine copies them into its cache.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def _row_bytes(ggml_type: int, n: int) -> int:
    blk, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return n // blk * size


# ------------------------------------------------------------------------------------- sambay

# magic, version, n_past, n_layer, n_embd_kv, d_inner, d_state, d_conv, n_swa, kv_type, model
# fingerprint, token-history hash, label length; the model's label (that many bytes) follows
_SB_HEADER = struct.Struct("<10IQQI")


def _sambay_header(real: bytes) -> tuple[tuple, int]:
    """The fixed header words of a sambay state and the size of its whole header (with the label)."""
    header = _SB_HEADER.unpack_from(real, 0)
    return header, _SB_HEADER.size + header[-1]


def _sambay_layout(hp: dict[str, Any], header: tuple, n_past: int) -> list[tuple[str, int]]:
    """(what, bytes) of every per-layer chunk of a sambay state at depth n_past."""
    _, _, _, n_layer, n_embd_kv, d_inner, d_state, d_conv, n_swa, kv_type = header[:10]
    row = _row_bytes(kv_type, n_embd_kv)
    chunks: list[tuple[str, int]] = []
    for il, kind in enumerate(hp["layer_types"]):
        if kind == "mamba":
            chunks += [(f"{il}.conv", (d_conv - 1) * d_inner * 4), (f"{il}.ssm", d_state * d_inner * 4)]
        elif kind in ("attn_swa", "attn_full"):
            kept = min(n_swa, n_past) if kind == "attn_swa" else n_past
            chunks += [(f"{il}.k", kept * row), (f"{il}.v", kept * row)]
    return chunks


def sambay_state(real: bytes, hp: dict[str, Any], depth: int) -> np.ndarray:
    """A sambay state at ``depth`` with the headers of ``real`` (a state the same context saved).

    It keeps ``real``'s token-history hash, so it loads only without a claimed token history."""
    header, n_head = _sambay_header(real)
    n_real = header[2]
    size = n_head + sum(n for _, n in _sambay_layout(hp, header, n_real))
    if size != len(real):
        raise ValueError(f"sambay state layout not understood: {len(real)} bytes, expected {size}")
    total = n_head + sum(n for _, n in _sambay_layout(hp, header, depth))
    out = np.zeros(total, dtype=np.uint8)
    out[:n_head] = np.frombuffer(real[:n_head], dtype=np.uint8)
    _SB_HEADER.pack_into(out, 0, *header[:2], depth, *header[3:])
    return out


def check_sambay(real: bytes, hp: dict[str, Any]) -> None:
    """Rebuilding ``real`` at its own depth gives the same bytes except the cached values."""
    header, n_head = _sambay_header(real)
    fake = sambay_state(real, hp, header[2])
    if len(fake) != len(real) or bytes(fake[:n_head]) != real[:n_head]:
        raise ValueError("sambay state rebuild differs from the saved state")


# ---------------------------------------------------------------------------------- llama.cpp
# llama_state_seq_get_data (llama.cpp as vendored by llama-cpp-python 0.3.36): a u32 magic and
# the i32 sequence id, then llama_kv_cache::state_write for that sequence: n_stream; per stream:
# cell_count, per cell (pos i32, n_seq_id u32, seq ids i32...),
# v_trans u32, n_layer u32, per layer (k type i32, k row bytes u64, rows), then V: per layer
# (type i32, row bytes u64, rows) or, transposed, (type i32, element bytes u32, n_embd u32,
# n_embd runs of cell_count elements).


def _parse_llamacpp(buf: bytes) -> dict[str, Any]:
    off = 8  # magic, seq id

    def take(fmt: str) -> tuple:
        nonlocal off
        if off + struct.calcsize(fmt) > len(buf):
            raise ValueError(f"llama.cpp state layout not understood: it ends at byte {len(buf)}")
        v = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return v

    (n_stream,) = take("<I")
    cells, v_trans, n_layer, k, v = 0, 0, 0, [], []
    for _ in range(n_stream):
        (n,) = take("<I")
        if n == 0:  # a stream without this sequence's cells
            continue
        if k:
            raise ValueError("llama.cpp state layout not understood (one sequence's cells in several streams)")
        cells = n
        for _ in range(cells):
            _pos, n_seq = take("<iI")
            if n_seq != 1:
                raise ValueError("llama.cpp state layout not understood (a cell with several sequences)")
            take("<i")
        v_trans, n_layer = take("<II")
        for _ in range(n_layer):
            t, row = take("<iQ")
            k.append((t, row))
            off += cells * row
        for _ in range(n_layer):
            if v_trans:
                t, el, n_embd = take("<iII")
                v.append((t, el, n_embd))
                off += n_embd * cells * el
            else:
                t, row = take("<iQ")
                v.append((t, row))
                off += cells * row
    if not k:
        raise ValueError("llama.cpp state without cells")
    if off != len(buf):
        raise ValueError(f"llama.cpp state layout not understood: parsed {off} of {len(buf)} bytes")
    return {"prefix": buf[:8], "n_stream": n_stream, "cells": cells, "v_trans": v_trans, "n_layer": n_layer,
            "k": k, "v": v}


def llamacpp_state(real: bytes, depth: int, n_stream: int = 1) -> np.ndarray:
    """A llama.cpp sequence state at ``depth`` (one sequence, id 0) shaped like ``real``.

    ``n_stream``: the KV streams of the context it is for (llama.cpp refuses a state whose
    stream count differs from the context's): 1 for a unified KV buffer, the number of
    sequences for per-sequence streams. The cells go in the first stream, the others are
    empty; a sequence's state is read into that sequence's own stream whichever stream held it."""
    p = _parse_llamacpp(real)
    n = depth
    size = 8 + 8 + n * 12 + 8 + 4 * (n_stream - 1)  # an empty stream is its cell count, 0
    size += sum(4 + 8 + n * row for _, row in p["k"])
    if p["v_trans"]:
        size += sum(4 + 4 + 4 + n_embd * n * el for _, el, n_embd in p["v"])
    else:
        size += sum(4 + 8 + n * row for _, row in p["v"])
    out = np.zeros(size, dtype=np.uint8)
    out[:8] = np.frombuffer(p["prefix"], dtype=np.uint8)
    off = 8

    def put(fmt: str, *vals: Any) -> None:
        nonlocal off
        struct.pack_into(fmt, out, off, *vals)
        off += struct.calcsize(fmt)

    put("<II", n_stream, n)
    cells = np.zeros((n, 3), dtype="<i4")
    cells[:, 0] = np.arange(n)  # pos
    cells[:, 1] = 1  # n_seq_id
    out[off: off + cells.nbytes] = cells.view(np.uint8).reshape(-1)
    off += cells.nbytes
    put("<II", p["v_trans"], p["n_layer"])
    for t, row in p["k"]:
        put("<iQ", t, row)
        off += n * row
    for v in p["v"]:
        if p["v_trans"]:
            t, el, n_embd = v
            put("<iII", t, el, n_embd)
            off += n_embd * n * el
        else:
            t, row = v
            put("<iQ", t, row)
            off += n * row
    put(f"<{n_stream - 1}I", *([0] * (n_stream - 1)))
    assert off == size
    return out


def check_llamacpp(real: bytes) -> None:
    """Rebuilding ``real`` at its own depth gives the same bytes except the cached values."""
    p = _parse_llamacpp(real)
    fake = llamacpp_state(real, p["cells"])
    if len(fake) != len(real):
        raise ValueError("llama.cpp state rebuild has the wrong size")
    # every byte the rebuild wrote as non-zero (headers, positions) must match
    saved = np.frombuffer(real, dtype=np.uint8)
    nz = np.nonzero(fake)[0]
    if not np.array_equal(fake[nz], saved[nz]):
        raise ValueError("llama.cpp state rebuild differs from the saved state in its headers")
