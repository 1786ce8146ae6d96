"""Streaming GGUF writer: header, KV and tensor infos first, then tensor data one at a time.

gguf.GGUFWriter keeps every tensor in memory until it writes; here it only packs the header,
the KV pairs and the tensor infos (shapes and types are known up front), and the data is
written chunk by chunk at the offsets those infos promise. Peak memory is one chunk/tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, Metadata

# numpy dtype of each storage type's array (BF16 travels as uint16 bit patterns)
NP_DTYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.BF16: np.dtype(np.uint16),
}


class KV(NamedTuple):
    """One metadata key/value pair; ``sub_type`` is the element type of arrays."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: Optional[GGUFValueType] = None


@dataclass(frozen=True)
class TensorOut:
    """A tensor to write: name, numpy-order shape, storage type, and a function that yields
    its data (C-order chunks of whole rows, already in the storage dtype)."""

    name: str
    shape: tuple[int, ...]
    gtype: GGMLQuantizationType
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NP_DTYPES[self.gtype].itemsize


def write_gguf(
    path: Path,
    arch: str,
    kvs: Sequence[KV],
    tensors: Sequence[TensorOut],
    *,
    metadata: Optional[Metadata] = None,
    progress: bool = False,
) -> None:
    """Write a GGUF file at ``path`` (created or truncated; the caller syncs and renames it).

    ``metadata`` (gguf-py's) writes the ``general.*`` authorship and sampling keys first.

    Raises:
        RuntimeError: a chunk stream produced the wrong dtype or byte count (a converter bug).
        Whatever the chunk functions raise (e.g. ConvertError on a truncated source).
    """
    w = GGUFWriter(path, arch)  # adds general.architecture
    if metadata is not None:
        metadata.set_gguf_meta_model(w)
    for kv in kvs:
        w.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, NP_DTYPES[t.gtype], t.nbytes, raw_dtype=t.gtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None and len(w.fout) == 1
        fout = w.fout[0]
        align = w.data_alignment
        w.write_padding(fout, fout.tell())
        data_start = fout.tell()
        offset = 0  # relative to data_start, as write_ti_data_to_file laid it out

        bar = _progress_bar(len(tensors), progress)
        try:
            for t in tensors:
                if fout.tell() != data_start + offset:
                    raise RuntimeError(
                        f"{t.name}: writing at {fout.tell()}, info says {data_start + offset}"
                    )
                want = NP_DTYPES[t.gtype]
                written = 0
                for chunk in t.chunks():
                    if chunk.dtype != want:
                        raise RuntimeError(f"{t.name}: chunk dtype {chunk.dtype}, expected {want}")
                    data = np.ascontiguousarray(chunk)
                    fout.write(memoryview(data).cast("B"))
                    written += data.nbytes
                if written != t.nbytes:
                    raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
                w.write_padding(fout, t.nbytes)
                offset += GGUFWriter.ggml_pad(t.nbytes, align)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        fout.flush()
    finally:
        w.close()


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc="converting", leave=False)
