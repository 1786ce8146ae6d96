"""GGUF -> GGUF quantization (``sambay quantize``), in C++ through ``ggml_quantize_chunk``.

The per-tensor rules follow llama-quantize: norms, biases, ``ssm_a``/``ssm_d``, the Mamba conv
kernel and the sub-norm stay F32; the tied embedding (also the output projection) gets Q6_K in
the quantized types (Q8_0 stays Q8_0); the ``_M`` types raise ``attn_qkv`` and part of
``ffn_down``; a row length the blocks don't divide (``ssm_dt``: dt_rank columns) falls back to
a type whose blocks do (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, else Q4_0, last F16).

The rules, the type names, llama-quantize's aliases (Q4_K, Q5_K) and numeric ids all live in
the C++ (``csrc/quantize.cpp``); this module only passes the options through.
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
    pure: bool = False,
    output_tensor_type: Optional[str] = None,
    token_embedding_type: Optional[str] = None,
    leave_output_tensor: bool = False,
    allow_requantize: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Quantize a phi4flash GGUF file (llama-quantize's options).

    The output projection is ``output.weight``, or ``token_embd.weight`` in a model without one
    (tied, as Phi-4-mini-flash-reasoning): the output options then apply to the embedding.

    Args:
        input_path: an F32, F16 or BF16 GGUF written by ``sambay convert`` (a quantized one
            with ``allow_requantize``).
        output_path: the file to write: created, or replaced if it is a regular file (symlinks
            are followed), through a temporary file renamed at the end, so an interrupted run
            leaves the old file as it was. Never the input itself, a folder, a device or a FIFO.
        qtype: one of :data:`QUANT_TYPES` (case-insensitive), llama-quantize's alias ``Q4_K``
            or ``Q5_K`` (the ``_M`` types), or its numeric id (``15``: Q4_K_M).
        n_threads: worker threads (default and 0: all cores).
        progress: show a progress bar over tensors on stderr.
        pure: no tensor raised above the type's default (the embedding, ``attn_qkv``, part of
            ``ffn_down``); rows the blocks do not divide still fall back.
        output_tensor_type: the output projection's ggml type (``q8_0``, ``f16``, ...).
        token_embedding_type: ``token_embd.weight``'s ggml type.
        leave_output_tensor: keep the output projection as stored.
        allow_requantize: accept a quantized input (dequantized, then quantized again: the
            errors of both add up); without it a quantized input is refused.
        dry_run: plan and sizes only; nothing is written (``output_path`` is not checked).

    Returns:
        ``{"bytes_in", "bytes_out", "tensor_types": [(name, type), ...], "plan": [(name,
        from_type, to_type, bytes_in, bytes_out), ...]}``.

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

    def run(output: str, **kw: Any) -> dict[str, Any]:
        return dict(_core.quantize_file(
            os.fspath(input_path), output, qtype, n_threads=n_threads or 0, pure=pure,
            output_type=output_tensor_type or "", token_embd_type=token_embedding_type or "",
            leave_output=leave_output_tensor, allow_requantize=allow_requantize, **kw))

    if dry_run:
        return run("", dry_run=True)
    target = resolve_output(output_path, [input_path], QuantizeError)
    try:
        with atomic_output(target, QuantizeError) as tmp:
            return run(os.fspath(tmp), progress=callback)
    finally:
        if bar is not None:
            bar.close()
