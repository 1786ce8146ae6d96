"""GGUF -> GGUF quantization (``sambay quantize``), in C++ through ``ggml_quantize_chunk``.

The per-tensor rules follow llama-quantize: norms, biases, ``ssm_a``/``ssm_d``, the Mamba conv
kernel and the sub-norm stay F32; the tied embedding (also the output projection) gets Q6_K in
the quantized types (Q8_0 stays Q8_0); the ``_M`` types raise ``attn_qkv`` and part of
``ffn_down``; a row length the blocks don't divide (``ssm_dt``: dt_rank columns) falls back to
a type whose blocks do (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, else Q4_0, last F16).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ._native import _core
from ._output import atomic_output, resolve_output

QuantizeError = _core.QuantizeError

#: every supported type name, e.g. ``"Q4_K_M"``
QUANT_TYPES: tuple[str, ...] = tuple(name for name, _, _ in _core.quantize_ftypes())


def quantize(
    input_path: Union[str, os.PathLike],
    output_path: Union[str, os.PathLike],
    qtype: str,
    *,
    n_threads: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize a phi4flash GGUF file.

    Args:
        input_path: an F32, F16 or BF16 GGUF written by ``sambay convert``.
        output_path: the file to write: created, or replaced if it is a regular file (symlinks
            are followed), through a temporary file renamed at the end, so an interrupted run
            leaves the old file as it was. Never the input itself, a folder, a device or a FIFO.
        qtype: one of :data:`QUANT_TYPES` (case-insensitive).
        n_threads: worker threads (default and 0: all cores).
        progress: show a progress bar over tensors on stderr.

    Returns:
        ``{"bytes_in", "bytes_out", "tensor_types": [(name, type), ...]}``.

    Raises:
        LoadError: an input the engine's loader refuses (missing, not a regular file, not a
            GGUF, a truncated or corrupt file, another architecture), with the message loading
            it as a model gives: the input is opened by the same loader.
        QuantizeError: unknown type, input already quantized or without a block count, an
            output that may not be replaced (see above), a failed write (e.g. "No space left
            on device").
        ValueError: invalid ``n_threads``.
    """
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                  or n_threads < 0):
        raise ValueError(f"n_threads must be an integer >= 0, got {n_threads!r}")
    callback = None
    bar = None
    if progress:
        from tqdm import tqdm

        def callback(i: int, n: int, name: str, type_name: str) -> None:
            nonlocal bar
            if bar is None:  # created on the first tensor: bad input fails before any output
                bar = tqdm(total=n, unit="tensor", desc=f"quantize {qtype}", leave=False)
            bar.set_postfix_str(f"{name} -> {type_name}", refresh=False)
            bar.update(1)

    target = resolve_output(output_path, [input_path], QuantizeError)
    try:
        with atomic_output(target, QuantizeError) as tmp:
            return dict(
                _core.quantize_file(
                    os.fspath(input_path), os.fspath(tmp), qtype,
                    n_threads=n_threads or 0, progress=callback,
                )
            )
    finally:
        if bar is not None:
            bar.close()
