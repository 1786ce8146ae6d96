"""Streaming, validating safetensors reader: headers are checked, offsets are never trusted.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes
of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data
buffer; offsets are relative to the buffer and must tile it exactly. Only headers are held in
memory; tensor data is read on demand, whole or in row chunks. No torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConvertError

# every dtype the format defines, with its size in bytes (to validate offsets)
ST_DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# the dtypes the converter reads; BF16 is read as its raw uint16 bit patterns
FLOAT_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``nbytes`` bytes at absolute ``offset`` in ``path``."""

    name: str
    dtype: str  # safetensors dtype string ("BF16", "F32", ...)
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header.

    Raises:
        ConvertError: on a truncated file, bad JSON, an unknown dtype, a shape that does not
            match its byte range, or data_offsets that overlap, leave gaps or leave the file.
    """
    where = path.name
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(
                    f"{where}: truncated safetensors file ({file_size} bytes, no header)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise ConvertError(
                    f"{where}: corrupt safetensors header length {n} (file is {file_size} bytes)"
                )
            raw = f.read(n)
    except OSError as err:
        raise ConvertError(f"{where}: cannot read: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        # RecursionError: deeply nested JSON ([[[[...) exhausts the parser's stack
        raise ConvertError(f"{where}: corrupt safetensors header (not JSON: {type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{where}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + n
    buffer_size = file_size - data_start
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ConvertError(f"{where}: corrupt header entry for {name}")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPE_SIZES:
            raise ConvertError(f"{where}: tensor {name} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ConvertError(f"{where}: tensor {name} has a bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise ConvertError(f"{where}: tensor {name} has bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * ST_DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != nbytes:
            raise ConvertError(
                f"{where}: tensor {name} {dtype}{shape} needs {nbytes} bytes but data_offsets "
                f"{offs} span {offs[1] - offs[0]}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), path, data_start + offs[0], nbytes))

    # the byte ranges must tile [0, buffer_size) exactly: no overlap, no gap, nothing outside
    pos = data_start
    for e in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        if e.offset != pos:
            kind = "overlaps another tensor" if e.offset < pos else "leaves a gap"
            raise ConvertError(f"{where}: corrupt data_offsets: tensor {e.name} {kind}")
        pos += e.nbytes
    if pos != file_size:
        problem = "truncated" if pos > file_size else "has trailing bytes"
        raise ConvertError(
            f"{where}: {problem}: the header describes {pos - data_start} data bytes, "
            f"the file holds {buffer_size}"
        )
    return {e.name: e for e in entries}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConvertError(f"{path.name}: cannot parse: {err}") from None


def open_checkpoint(hf_dir: Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint folder: one file, an index + shards, or loose *.safetensors.

    Raises:
        ConvertError: no safetensors, a bad index, a missing shard, a tensor in two files or
            a tensor the index puts in another file than the one holding it.
    """
    index_path = hf_dir / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ConvertError(f"{INDEX_NAME}: no valid weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file() or "/" in f or "\\" in f]
        if missing:
            raise ConvertError(f"{INDEX_NAME}: missing shard file(s): {', '.join(missing)}")
    elif (hf_dir / SINGLE_NAME).is_file():
        weight_map = None
        files = [SINGLE_NAME]
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        weight_map = None
        if not files:
            raise ConvertError(f"{hf_dir}: no *.safetensors files (and no {INDEX_NAME})")

    tensors: dict[str, TensorEntry] = {}
    for fname in files:
        for name, entry in read_header(hf_dir / fname).items():
            if name in tensors:
                raise ConvertError(
                    f"tensor {name} appears in both {tensors[name].path.name} and {fname}"
                )
            tensors[name] = entry
    if weight_map is not None:
        wrong = [n for n, f in weight_map.items() if n not in tensors or tensors[n].path.name != f]
        if wrong:
            raise ConvertError(
                f"{INDEX_NAME}: {len(wrong)} tensor(s) not in the shard it names: {', '.join(sorted(wrong))}"
            )
    return tensors


def _read_exact(f, nbytes: int, entry: TensorEntry) -> bytearray:
    buf = bytearray(nbytes)
    got = f.readinto(buf)
    if got != nbytes:
        raise ConvertError(f"{entry.path.name}: truncated while reading tensor {entry.name}")
    return buf


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """The whole tensor in its stored dtype (BF16 as uint16 bit patterns)."""
    dtype = FLOAT_DTYPES[entry.dtype]
    try:
        with open(entry.path, "rb") as f:
            f.seek(entry.offset)
            buf = _read_exact(f, entry.nbytes, entry)
    except OSError as err:
        raise ConvertError(f"{entry.path.name}: cannot read tensor {entry.name}: {err}") from None
    return np.frombuffer(buf, dtype=dtype).reshape(entry.shape)


def iter_rows(entry: TensorEntry, max_bytes: int) -> Iterator[np.ndarray]:
    """The tensor in chunks of whole rows (outermost axis), each at most ~``max_bytes``."""
    if len(entry.shape) < 2 or entry.nbytes == 0:
        yield read_tensor(entry)
        return
    dtype = FLOAT_DTYPES[entry.dtype]
    row_shape = entry.shape[1:]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    rows_per_chunk = max(1, max_bytes // row_bytes)
    try:
        with open(entry.path, "rb") as f:
            f.seek(entry.offset)
            for r0 in range(0, entry.n_rows, rows_per_chunk):
                n = min(rows_per_chunk, entry.n_rows - r0)
                buf = _read_exact(f, n * row_bytes, entry)
                yield np.frombuffer(buf, dtype=dtype).reshape((n, *row_shape))
    except OSError as err:
        raise ConvertError(f"{entry.path.name}: cannot read tensor {entry.name}: {err}") from None
