"""Writes the minimised regression GGUFs in tests/data/gguf_regressions/ (small hand-reduced
reproductions of what fuzzing found, plus one file per hostile-input class of the issue).
Each file's expected LoadError fragment is in EXPECTED, which tests/test_gguf_fuzz.py checks.

    python fuzz/make_regressions.py tests/data/gguf_regressions
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fuzz import GGUF, KV, TInfo, serialize  # noqa: E402

ARCH = KV(b"general.architecture", 8, b"phi4flash")


def g(kvs=None, tensors=None, data=b"", **kw) -> bytes:
    return serialize(GGUF(3, [ARCH] + (kvs or []), tensors or [], data, **kw))[0]


def patch(buf: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


F32 = 0
CASES: dict[str, tuple[bytes, str]] = {
    # found by fuzzing: the error message was built from the tensor name after gguf_free
    # (heap-use-after-free, ASan); reduced to one tensor whose data is missing
    "uaf-tensor-data-past-eof.gguf": (g(tensors=[TInfo(b"token_embd.weight", [8, 4], F32, 0)]),
                                      "beyond the end of the file"),
    # found by fuzzing: a name that is not UTF-8 inside the message -> UnicodeDecodeError
    "non-utf8-tensor-name.gguf": (g(tensors=[TInfo(b"blk.\xff\xfe.w", [8], F32, 0)]), "\\xff\\xfe"),
    "non-utf8-architecture.gguf": (serialize(GGUF(3, [KV(b"general.architecture", 8, b"phi\xc3\x28")], [], b""))[0],
                                   "unsupported architecture 'phi\\xc3("),
    # ggml's parser accepts a [2^40, 2^40] F32 tensor (its byte size wraps to 0): the loader's
    # own element/byte count rejects it
    # the list of hostile headers
    "huge-tensor-count.gguf": (patch(g(), 8, "<Q", 0xFFFFFFFFFFFFFFFF), "cannot parse the GGUF header"),
    "huge-kv-count.gguf": (patch(g(), 16, "<Q", 0x7FFFFFFFFFFFFFFF), "cannot parse the GGUF header"),
    "huge-string-length.gguf": (patch(g(), 24, "<Q", 1 << 62), "cannot parse the GGUF header"),
    "huge-array-count.gguf": (g(kvs=[KV(b"phi4flash.layer_types", 9, (5, [0]))]), ""),  # patched below
    "negative-dimension.gguf": (g(tensors=[TInfo(b"token_embd.weight", [8, -4], F32, 0)], data=bytes(128)),
                                "cannot parse the GGUF header"),
    "overflowing-dimensions.gguf": (g(tensors=[TInfo(b"token_embd.weight", [1 << 40, 1 << 40], F32, 0)],
                                      data=bytes(128)), "absurd shape"),
    "bad-tensor-type.gguf": (g(tensors=[TInfo(b"token_embd.weight", [32], 1000, 0)], data=bytes(128)),
                             "cannot parse the GGUF header"),
    "duplicate-key.gguf": (g(kvs=[KV(b"phi4flash.block_count", 4, 8), KV(b"phi4flash.block_count", 4, 8)]),
                           "cannot parse the GGUF header"),
    "duplicate-tensor.gguf": (g(tensors=[TInfo(b"output_norm.weight", [8], F32, 0),
                                         TInfo(b"output_norm.weight", [8], F32, 32)], data=bytes(64)),
                              "cannot parse the GGUF header"),
    "misaligned-offset.gguf": (g(tensors=[TInfo(b"output_norm.weight", [8], F32, 4)], data=bytes(64)),
                               "cannot parse the GGUF header"),
    "offset-past-eof.gguf": (g(tensors=[TInfo(b"output_norm.weight", [8], F32, 0),
                                        TInfo(b"output_norm.bias", [1 << 20], F32, 32)], data=bytes(64)),
                             "beyond the end of the file"),
    "alignment-zero.gguf": (g(kvs=[KV(b"general.alignment", 4, 0)]), "cannot parse the GGUF header"),
    "alignment-not-power-of-two.gguf": (g(kvs=[KV(b"general.alignment", 4, 48)]), "cannot parse the GGUF header"),
    "wrong-type-for-known-key.gguf": (g(kvs=[KV(b"phi4flash.block_count", 8, b"eight")]),
                                      "expected an unsigned integer"),
    "nan-epsilon.gguf": (g(kvs=[KV(b"phi4flash.attention.layer_norm_epsilon", 6, float("nan"))]),
                         "layer_norm_epsilon"),
    "bad-version.gguf": (patch(g(), 4, "<I", 0xFFFFFFFF), "cannot parse the GGUF header"),
    "header-only.gguf": (b"GGUF\x03\x00\x00\x00", "cannot parse the GGUF header"),
}
# an array whose element count promises far more bytes than the file has
_arr = g(kvs=[KV(b"phi4flash.layer_types", 9, (5, [0]))])
CASES["huge-array-count.gguf"] = (patch(_arr, _arr.index(b"phi4flash.layer_types") + 21 + 4, "<Q", 1 << 60),
                                  "cannot parse the GGUF header")

EXPECTED = {name: frag for name, (_, frag) in CASES.items()}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in CASES.items():
        (out / name).write_bytes(data)
    print(f"{len(CASES)} files in {out}")


if __name__ == "__main__":
    main()
