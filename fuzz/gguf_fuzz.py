"""Structure-aware GGUF fuzzer for sambay's load path (``sambay.engine.Model``, which
``sambay.Llama`` uses), run against a sanitizer build (fuzz/README.md).

Seeds are GGUF files converted from the tiny test checkpoints. Each input is a seed with one to
three mutations: flipped bytes, a truncation at (or next to) a section boundary, a huge count or
string length, a negative or overflowing dimension, another type for a known key or a tensor, a
duplicated key or tensor, a misaligned or past-EOF tensor offset, a bad ``general.alignment``,
tensor data whose size does not match ne x type size, values of the wrong kind for the engine's
own keys. Inputs go to a worker subprocess that loads them one after the other (and, when a file
loads, evaluates two tokens); a worker that dies (signal, sanitizer report) or exceeds the
per-input time limit is a finding: the input is saved under ``--out``. Every input that does not
load must raise exactly ``sambay.LoadError`` with a message; any other exception is a finding.

    python fuzz/gguf_fuzz.py --asan --inputs 10000 --seed 1 --out /tmp/fuzz-out
    python fuzz/gguf_fuzz.py --replay tests/data/gguf_regressions     # each file once

The run is deterministic for a given --seed (inputs are generated from it, not from coverage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# ---------------------------------------------------------------------------------------------
# GGUF structure (enough to mutate it meaningfully and write it back)

GGUF_TYPES = {  # value type -> struct format of one scalar (None: string / array)
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    8: None, 9: None, 10: "<Q", 11: "<q", 12: "<d",
}
INTERESTING_U64 = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000,
                   0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFE, 1 << 40, 1 << 62]
INTERESTING_I64 = [0, -1, -2, 1, 2, 3, 31, 32, 33, 255, 256, 1 << 31, -(1 << 31), (1 << 32) + 1,
                   1 << 62, (1 << 63) - 1, -(1 << 63), 1 << 40, 3 << 61]
GGML_TYPES = list(range(0, 42)) + [100, 255, 0x7FFFFFFF, 0xFFFFFFFF]


@dataclass
class KV:
    key: bytes
    vtype: int
    value: Any  # scalar; bytes for a string; (subtype, [items]) for an array


@dataclass
class TInfo:
    name: bytes
    ne: list[int]
    ttype: int
    offset: int


@dataclass
class GGUF:
    version: int
    kvs: list[KV]
    tensors: list[TInfo]
    data: bytes  # the data section (after alignment padding)
    alignment: int = 32
    # forced header counts (None: the real ones); used to write lying counts
    n_tensors_override: Optional[int] = None
    n_kv_override: Optional[int] = None
    raw_patches: list[tuple[str, Any]] = field(default_factory=list)


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0]

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            sub = self.take("<I")
            n = self.take("<Q")
            return (sub, [self.value(sub) for _ in range(n)])
        return self.take(GGUF_TYPES[vtype])


def parse(buf: bytes) -> GGUF:
    r = _Reader(buf)
    assert buf[:4] == b"GGUF"
    r.pos = 4
    version = r.take("<I")
    n_tensors = r.take("<Q")
    n_kv = r.take("<Q")
    kvs = []
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("<I")
        kvs.append(KV(key, vtype, r.value(vtype)))
        if key == b"general.alignment":
            alignment = kvs[-1].value
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("<I")
        ne = [r.take("<q") for _ in range(nd)]
        ttype = r.take("<I")
        off = r.take("<Q")
        tensors.append(TInfo(name, ne, ttype, off))
    start = (r.pos + alignment - 1) // alignment * alignment
    return GGUF(version, kvs, tensors, buf[start:], alignment)


class _Out:
    """bytes pieces plus their running length"""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.n = 0

    def append(self, b: bytes) -> None:
        self.pieces.append(b)
        self.n += len(b)


def _pack_value(vtype: int, value: Any, out: _Out, marks: list[tuple[str, int]]) -> None:
    if vtype == 8:
        marks.append(("strlen", out.n))
        out.append(struct.pack("<Q", len(value)))
        out.append(value)
    elif vtype == 9:
        sub, items = value
        out.append(struct.pack("<I", sub))
        marks.append(("count", out.n))
        out.append(struct.pack("<Q", len(items)))
        if sub == 8 and len(items) > 64:  # token lists: no marks inside, one join
            out.append(b"".join(struct.pack("<Q", len(it)) + it for it in items))
            return
        for it in items:
            _pack_value(sub, it, out, marks)
    else:
        fmt = GGUF_TYPES.get(vtype)
        if fmt is None:
            raise ValueError(f"cannot pack type {vtype}")
        out.append(struct.pack(fmt, value))


def serialize(g: GGUF) -> tuple[bytes, list[int], list[tuple[str, int]]]:
    """Bytes of the file, its section boundaries, and marks (kind, byte offset) of the u64
    count/length fields and the ne fields (for in-place value mutations)."""
    out = _Out()
    marks: list[tuple[str, int]] = []
    bounds = [0, 4, 8]
    out.append(b"GGUF" + struct.pack("<I", g.version))
    marks.append(("count", 8))
    marks.append(("count", 16))
    out.append(struct.pack("<QQ", len(g.tensors) if g.n_tensors_override is None else g.n_tensors_override,
                           len(g.kvs) if g.n_kv_override is None else g.n_kv_override))
    bounds += [16, 24]
    for kv in g.kvs:
        marks.append(("strlen", out.n))
        out.append(struct.pack("<Q", len(kv.key)) + kv.key)
        marks.append(("vtype", out.n))
        out.append(struct.pack("<I", kv.vtype))
        _pack_value(kv.vtype, kv.value, out, marks)
        bounds.append(out.n)
    for t in g.tensors:
        marks.append(("strlen", out.n))
        out.append(struct.pack("<Q", len(t.name)) + t.name)
        out.append(struct.pack("<I", len(t.ne)))
        for v in t.ne:
            marks.append(("ne", out.n))
            out.append(struct.pack("<q", v))
        marks.append(("ttype", out.n))
        out.append(struct.pack("<I", t.ttype & 0xFFFFFFFF))
        marks.append(("offset", out.n))
        out.append(struct.pack("<Q", t.offset & 0xFFFFFFFFFFFFFFFF))
        bounds.append(out.n)
    n = out.n
    align = g.alignment if isinstance(g.alignment, int) and 0 < g.alignment < (1 << 16) else 32
    pad = (-n) % align
    out.append(b"\0" * pad)
    bounds.append(n + pad)
    data_start = n + pad
    for t in g.tensors:
        if 0 <= t.offset < len(g.data):
            bounds.append(data_start + t.offset)
    out.append(g.data)
    bounds.append(data_start + len(g.data))
    return b"".join(out.pieces), sorted(set(bounds)), marks


# ---------------------------------------------------------------------------------------------
# mutations: each takes (rng, GGUF) and changes it, or returns bytes for byte-level ones


def _pick_kv(rng: random.Random, g: GGUF, prefix: bytes = b"") -> Optional[KV]:
    cands = [kv for kv in g.kvs if kv.key.startswith(prefix)] or g.kvs
    return rng.choice(cands) if cands else None


def m_wrong_type(rng: random.Random, g: GGUF) -> None:
    kv = _pick_kv(rng, g, b"phi4flash." if rng.random() < 0.7 else b"")
    if kv is None:
        return
    choice = rng.randrange(6)
    if choice == 0:
        kv.vtype, kv.value = 8, b"not a number"
    elif choice == 1:
        kv.vtype, kv.value = 4, rng.choice([0, 1, 0xFFFFFFFF, 7])
    elif choice == 2:
        kv.vtype, kv.value = 6, rng.choice([float("nan"), float("inf"), -1.0, 1e30, 0.0])
    elif choice == 3:
        kv.vtype, kv.value = 9, (rng.choice([0, 4, 5, 6, 8, 10, 12, 7]), [])
    elif choice == 4:
        kv.vtype, kv.value = 11, rng.choice(INTERESTING_I64)
    else:
        kv.vtype, kv.value = 7, rng.random() < 0.5


def m_array_change(rng: random.Random, g: GGUF) -> None:
    arrays = [kv for kv in g.kvs if kv.vtype == 9]
    if not arrays:
        return
    kv = rng.choice(arrays)
    sub, items = kv.value
    choice = rng.randrange(5)
    if choice == 0:
        items = items[: rng.randrange(len(items) + 1)]
    elif choice == 1:
        items = items + items[: rng.randrange(1, 5)]
    elif choice == 2 and sub in (4, 5, 10, 11, 0, 1, 2, 3) and items:
        i = rng.randrange(len(items))
        items = list(items)
        lo, hi = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, 2**32 - 1),
                  5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}[sub]
        items[i] = max(lo, min(hi, rng.choice(INTERESTING_I64)))
    elif choice == 3 and sub in (6, 12) and items:
        items = list(items)
        items[rng.randrange(len(items))] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e300 if sub == 12 else 1e30])
    else:
        # another element type with the same items where that packs, else empty
        new_sub = rng.choice([0, 4, 5, 6, 7, 8, 10, 12])
        try:
            conv = [(_conv(new_sub, v)) for v in items]
        except (ValueError, TypeError, OverflowError):
            conv = []
        sub, items = new_sub, conv
    kv.value = (sub, items)


def _conv(sub: int, v: Any) -> Any:
    if sub == 8:
        return str(v).encode()
    if sub in (6, 12):
        return float(v) if not isinstance(v, bytes) else 0.0
    if sub == 7:
        return bool(v)
    if isinstance(v, bytes):
        raise ValueError
    iv = int(v)
    lo, hi = {0: (0, 255), 4: (0, 2**32 - 1), 5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1)}[sub]
    if not lo <= iv <= hi:
        raise ValueError
    return iv


def m_dup_key(rng: random.Random, g: GGUF) -> None:
    kv = _pick_kv(rng, g)
    if kv is not None:
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), KV(kv.key, kv.vtype, kv.value))


def m_dup_tensor(rng: random.Random, g: GGUF) -> None:
    if g.tensors:
        t = rng.choice(g.tensors)
        g.tensors.insert(rng.randrange(len(g.tensors) + 1), TInfo(t.name, list(t.ne), t.ttype, t.offset))


def m_rename(rng: random.Random, g: GGUF) -> None:
    if rng.random() < 0.5 and g.tensors:
        t = rng.choice(g.tensors)
        other = rng.choice(g.tensors)
        t.name = rng.choice([other.name, b"", t.name + b"\xff\xfe", b"x" * 70, t.name[:-1]])
    else:
        kv = _pick_kv(rng, g)
        if kv is not None:
            kv.key = rng.choice([b"", kv.key + b"\x00", b"\xc3\x28" + kv.key, rng.choice(g.kvs).key])


def m_drop(rng: random.Random, g: GGUF) -> None:
    if rng.random() < 0.5 and g.kvs:
        del g.kvs[rng.randrange(len(g.kvs))]
    elif g.tensors:
        del g.tensors[rng.randrange(len(g.tensors))]


def m_dims(rng: random.Random, g: GGUF) -> None:
    if not g.tensors:
        return
    t = rng.choice(g.tensors)
    choice = rng.randrange(4)
    if choice == 0 and t.ne:
        t.ne[rng.randrange(len(t.ne))] = rng.choice(INTERESTING_I64)
    elif choice == 1:
        t.ne = t.ne + [rng.choice([1, 2, 0, -1, 1 << 40])] * rng.randrange(1, 4)  # up to 7 dims
    elif choice == 2:
        t.ne = t.ne[:rng.randrange(len(t.ne) + 1)]
    else:
        t.ne = list(reversed(t.ne))


def m_ttype(rng: random.Random, g: GGUF) -> None:
    if g.tensors:
        rng.choice(g.tensors).ttype = rng.choice(GGML_TYPES)


def m_offset(rng: random.Random, g: GGUF) -> None:
    if not g.tensors:
        return
    t = rng.choice(g.tensors)
    choice = rng.randrange(5)
    if choice == 0:
        t.offset += rng.choice([1, 2, 4, 16, 31, -1])
    elif choice == 1:
        t.offset = len(g.data) + rng.choice([0, 32, 1 << 20])
    elif choice == 2:
        t.offset = rng.choice(INTERESTING_U64)
    elif choice == 3:
        t.offset = rng.choice(g.tensors).offset  # overlap another tensor
    else:
        t.offset = max(0, len(g.data) - 32)  # runs past EOF
    t.offset &= 0xFFFFFFFFFFFFFFFF


def m_alignment(rng: random.Random, g: GGUF) -> None:
    g.kvs = [kv for kv in g.kvs if kv.key != b"general.alignment"]
    v = rng.choice([0, 1, 3, 8, 64, 48, 1 << 20, 0xFFFFFFFF])
    g.kvs.append(KV(b"general.alignment", rng.choice([4, 4, 4, 10, 8]), v if rng.random() < 0.8 else b"32"))
    if g.kvs[-1].vtype == 8:
        g.kvs[-1].value = b"32"


def m_data_size(rng: random.Random, g: GGUF) -> None:
    choice = rng.randrange(3)
    if choice == 0:
        g.data = g.data[: rng.randrange(len(g.data) + 1)]
    elif choice == 1:
        g.data = g.data + bytes(rng.randrange(1, 4096))
    elif g.tensors:
        # a tensor whose ne no longer matches the bytes between it and the next offset
        t = rng.choice(g.tensors)
        if t.ne:
            t.ne[0] = max(1, t.ne[0] * rng.choice([2, 3]) // rng.choice([1, 2]))


def m_counts(rng: random.Random, g: GGUF) -> None:
    if rng.random() < 0.5:
        g.n_tensors_override = rng.choice(INTERESTING_U64 + [len(g.tensors) + 1, max(0, len(g.tensors) - 1)])
    else:
        g.n_kv_override = rng.choice(INTERESTING_U64 + [len(g.kvs) + 1, max(0, len(g.kvs) - 1)])


def m_version(rng: random.Random, g: GGUF) -> None:
    g.version = rng.choice([0, 1, 2, 4, 0xFFFFFFFF, 0x03000000])


def m_hparam_values(rng: random.Random, g: GGUF) -> None:
    kv = _pick_kv(rng, g, b"phi4flash.")
    if kv is None:
        return
    if kv.vtype in (0, 2, 4, 10):
        kv.value = rng.choice([v for v in INTERESTING_U64 if v < (1 << {0: 8, 2: 16, 4: 32, 10: 64}[kv.vtype])])
    elif kv.vtype in (1, 3, 5, 11):
        bits = {1: 8, 3: 16, 5: 32, 11: 64}[kv.vtype]
        kv.value = rng.choice([v for v in INTERESTING_I64 if -(1 << (bits - 1)) <= v < (1 << (bits - 1))])
    elif kv.vtype in (6, 12):
        kv.value = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e-45, 1e30])
    elif kv.vtype == 7:
        kv.value = not kv.value
    elif kv.vtype == 9:
        m_array_change(rng, g)


STRUCTURAL: list[tuple[float, Callable[[random.Random, GGUF], None]]] = [
    (3, m_wrong_type), (3, m_array_change), (1, m_dup_key), (1, m_dup_tensor), (1, m_rename),
    (1, m_drop), (3, m_dims), (2, m_ttype), (3, m_offset), (1, m_alignment), (2, m_data_size),
    (1, m_counts), (0.3, m_version), (4, m_hparam_values),
]


def byte_level(rng: random.Random, buf: bytes, bounds: list[int], marks: list[tuple[str, int]]) -> bytes:
    """Flip bytes, truncate at a section boundary, or overwrite a count/length/ne field."""
    b = bytearray(buf)
    choice = rng.randrange(4)
    header_end = bounds[-2] if len(bounds) > 1 else len(b)
    if choice == 0:
        for _ in range(rng.randrange(1, 9)):
            hi = header_end if rng.random() < 0.8 else len(b)
            if hi > 0:
                b[rng.randrange(hi)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if choice == 1:
        cut = rng.choice(bounds) + rng.choice([0, 0, 0, -1, 1, -4, 4, -8])
        return bytes(b[: max(0, min(len(b), cut))])
    if choice == 2 and marks:
        kind, off = rng.choice(marks)
        if kind in ("count", "strlen", "offset"):
            b[off:off + 8] = struct.pack("<Q", rng.choice(INTERESTING_U64))
        elif kind == "ne":
            b[off:off + 8] = struct.pack("<q", rng.choice(INTERESTING_I64))
        else:  # vtype / ttype
            b[off:off + 4] = struct.pack("<I", rng.choice(list(range(16)) + [0xFFFFFFFF, 1 << 31]))
        return bytes(b)
    # random bytes spliced into the header
    pos = rng.randrange(max(1, header_end))
    b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    return bytes(b)


_PARSED: dict[int, GGUF] = {}


def _copy(g: GGUF) -> GGUF:
    """a copy that the mutations may change (array item lists are never changed in place)"""
    return GGUF(g.version, [KV(k.key, k.vtype, k.value) for k in g.kvs],
                [TInfo(t.name, list(t.ne), t.ttype, t.offset) for t in g.tensors], g.data, g.alignment)


def mutate(rng: random.Random, seed_buf: bytes) -> bytes:
    if id(seed_buf) not in _PARSED:
        _PARSED[id(seed_buf)] = parse(seed_buf)
    g = _copy(_PARSED[id(seed_buf)])
    weights = [w for w, _ in STRUCTURAL]
    n_struct = rng.choice([0, 1, 1, 2, 3])
    for fn in rng.choices([f for _, f in STRUCTURAL], weights=weights, k=n_struct):
        fn(rng, g)
    try:
        buf, bounds, marks = serialize(g)
    except (ValueError, struct.error, OverflowError, TypeError):
        buf, bounds, marks = serialize(_copy(_PARSED[id(seed_buf)]))
    if n_struct == 0 or rng.random() < 0.4:
        buf = byte_level(rng, buf, bounds, marks)
    return buf


# ---------------------------------------------------------------------------------------------
# the worker: loads each path it reads on stdin, answers one JSON line per path


def worker() -> int:
    """Each file goes the way sambay.Llama takes it: Model + Context (LoadError is the one
    allowed failure), then two tokens evaluated, the tokenizer rebuilt from the metadata
    (TokenizerError allowed) and the chat template rendered (ChatTemplateError allowed)."""
    import logging

    logging.disable(logging.CRITICAL)
    from sambay import ChatTemplateError, Llama, LoadError, TokenizerError

    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        res: dict[str, Any]
        stage = "load"
        try:
            llm = Llama(path, n_ctx=8, n_batch=4, n_threads=1, n_threads_batch=1, device="cpu",
                        use_mmap=hashlib.md5(path.encode()).digest()[0] % 2 == 0, seed=0, verbose=False)
            stage = "eval"
            llm.eval([0, llm.n_vocab() - 1])
            res = {"outcome": "loaded", "n_keys": len(llm.metadata)}
            try:
                stage = "tokenizer"
                ids = llm.tokenize(b"hi \xff<|end|>", special=True)
                llm.detokenize(ids)
                stage = "chat"
                if llm.metadata.get("tokenizer.chat_template"):
                    llm.chat_formatter.render([{"role": "user", "content": "x"}])
            except (TokenizerError, ChatTemplateError) as err:
                res["soft_error"] = f"{stage}: {type(err).__name__}"
        except LoadError as err:
            msg = str(err)
            res = {"outcome": "rejected", "message": msg.splitlines()[0][:300]}
            if not msg.strip() or stage != "load":
                res = {"outcome": "bad-exception", "type": "LoadError", "stage": stage, "message": msg[:300]}
        except Exception as err:  # noqa: BLE001 - any other exception is a finding
            res = {"outcome": "bad-exception", "type": type(err).__name__, "stage": stage, "message": str(err)[:300]}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    return 0


class Worker:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.stderr_path = Path(tempfile.mkstemp(prefix="gguf-fuzz-", suffix=".stderr")[1])

    def start(self) -> None:
        self.stderr_file = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_file, env=self.env,
        )

    def run(self, path: str, timeout: float) -> tuple[str, dict[str, Any]]:
        """('ok', result) | ('crash', {rc, stderr}) | ('hang', {})"""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write((path + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return "hang", {}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return self._died()
                return "ok", json.loads(line)

    def _died(self) -> tuple[str, dict[str, Any]]:
        assert self.proc is not None
        rc = self.proc.wait()
        self.stderr_file.close()
        raw = self.stderr_path.read_bytes()
        start = max(raw.find(b"==ERROR"), raw.find(b"runtime error"), raw.find(b"GGML_ASSERT"), 0)
        err = raw[start:start + 6000].decode("utf-8", "replace")  # the report's head, not its tail
        self.proc = None
        return "crash", {"rc": rc, "signal": signal.Signals(-rc).name if rc < 0 else None, "stderr": err}

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.stderr_file.close()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin:
            self.proc.stdin.close()
            self.proc.wait()
            self.stderr_file.close()
            self.proc = None
        self.stderr_path.unlink(missing_ok=True)


SEED_NAMES = ("tiny-8-f32.gguf", "tiny-8-f16.gguf", "tiny-8-q8_0.gguf")


def make_seeds(folder: Path) -> list[Path]:
    """Tiny phi4flash GGUFs from the test checkpoints: F32, F16 and Q8_0."""
    from sambay.convert import convert, tiny

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SEED_NAMES:
        config, outtype = name[:-len(".gguf")].rsplit("-", 1)
        path = folder / f"{config}-{outtype}.gguf"
        if not path.exists():
            hf = folder / f"{config}-hf"
            if not (hf / "config.json").exists():
                tiny.write_checkpoint(hf, config, seed=0)
            if outtype == "q8_0":
                from sambay.quantization import quantize

                f32 = folder / f"{config}-f32.gguf"
                if not f32.exists():
                    convert(hf, f32, outtype="f32", progress=False)
                quantize(f32, path, "Q8_0")
            else:
                convert(hf, path, outtype=outtype, progress=False)
        out.append(path)
    return out


def asan_runtime() -> str:
    """LD_PRELOAD value for a Python process that imports a SAMBAY_SANITIZE build (gcc's
    ASan and UBSan runtimes; the interpreter itself is not instrumented)."""
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not out or not os.path.isabs(out):
            raise SystemExit(f"gcc does not know {name}: install gcc to run a sanitizer build")
        libs.append(out)
    return ":".join(libs)


def sanitizer_env(asan: bool) -> dict[str, str]:
    env = dict(os.environ)
    if asan:
        env["LD_PRELOAD"] = asan_runtime()
    # leaks of the interpreter itself are not ours: fuzz/leakcheck.cpp checks the engine's
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make-seeds", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--inputs", type=int, default=1000, help="how many mutated inputs (default 1000)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="per-input time limit, seconds")
    ap.add_argument("--seeds-dir", type=Path, default=Path(tempfile.gettempdir()) / "sambay-fuzz-seeds")
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings are saved")
    ap.add_argument("--replay", type=Path, help="run each file of this folder once instead")
    ap.add_argument("--summary", type=Path, help="write the summary JSON here too")
    ap.add_argument("--asan", action="store_true",
                    help="preload gcc's ASan/UBSan runtimes in the workers (for a SAMBAY_SANITIZE build)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    if args.make_seeds:
        make_seeds(args.make_seeds)
        return 0

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))
    w = Worker(sanitizer_env(args.asan))
    counts: dict[str, int] = {"inputs": 0, "loaded": 0, "rejected": 0, "crash": 0, "hang": 0,
                              "bad-exception": 0}
    messages: dict[str, int] = {}
    t0 = time.monotonic()
    findings: list[dict[str, Any]] = []

    def record(kind: str, data: bytes, info: dict[str, Any]) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha1(data).hexdigest()[:16]
        (args.out / f"{kind}-{h}.gguf").write_bytes(data)
        (args.out / f"{kind}-{h}.json").write_text(json.dumps(info, indent=1))
        findings.append({"kind": kind, "file": f"{kind}-{h}.gguf", **{k: v for k, v in info.items() if k != "stderr"}})
        print(f"  FINDING {kind}: {args.out / f'{kind}-{h}.gguf'} {json.dumps(info)[:400]}", flush=True)

    if args.replay:
        sources = [(p.read_bytes(), p.name) for p in sorted(args.replay.glob("*.gguf"))]
    else:
        # in a child with the workers' environment: sambay is never imported here (a sanitizer
        # build cannot be imported without its runtime preloaded)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--make-seeds", str(args.seeds_dir)],
                       env=sanitizer_env(args.asan), check=True)
        seeds = [(args.seeds_dir / n).read_bytes() for n in SEED_NAMES]
        sources = None
    n = len(sources) if sources is not None else args.inputs
    try:
        for i in range(n):
            if args.seconds and time.monotonic() - t0 > args.seconds:
                break
            if sources is not None:
                data, label = sources[i]
            else:
                data, label = mutate(rng, rng.choice(seeds)), f"#{i}"
            path = work / f"in-{i % 4}.gguf"
            path.write_bytes(data)
            kind, res = w.run(str(path), args.timeout)
            counts["inputs"] += 1
            if kind == "ok":
                counts[res["outcome"]] += 1
                if res["outcome"] == "rejected":
                    key = res["message"].split("'", 2)[-1][:60] if "'" in res["message"] else res["message"][:60]
                    messages[key] = messages.get(key, 0) + 1
                elif res["outcome"] == "bad-exception":
                    record("exception", data, {"input": label, **res})
            else:
                counts[kind] += 1
                record(kind, data, {"input": label, **res})
            if (i + 1) % 500 == 0:
                print(f"{i + 1} inputs, {time.monotonic() - t0:.0f} s: {counts}", flush=True)
    finally:
        w.close()
    summary = {"counts": counts, "seconds": round(time.monotonic() - t0, 1), "seed": args.seed,
               "findings": findings,
               "top_rejections": sorted(messages.items(), key=lambda kv: -kv[1])[:25]}
    print(json.dumps(summary, indent=1))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
