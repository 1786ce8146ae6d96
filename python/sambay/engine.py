"""The C++ engine (``sambay._core``) with typed, documented wrappers.

:class:`Model` loads a phi4flash GGUF (docs/gguf-format.md) into ggml backend buffers;
:class:`Context` evaluates one token sequence on it, keeping the SambaY memory: constant-size
Mamba states, small sliding-window K/V rings, and one full K/V cache written by the shared-KV
layer and read by every cross-attention layer.

Errors:
    LoadError (a ValueError): the file is not a valid phi4flash GGUF.
    ContextFullError (a ValueError, as in llama-cpp-python, and a RuntimeError): an eval
        would exceed ``n_ctx``; carries ``n_requested`` and ``n_ctx``.
    StateError (a ValueError): a saved state does not fit the context, or the context was
        cancelled inside a computation and needs reset()/load_state() first.
    AbortedError (a RuntimeError): Context.cancel() stopped an eval.
    ComputeError (a RuntimeError): the backend cannot allocate a context's memory or compute
        buffers (out of memory: the message names n_ctx/n_batch), or a graph compute failed.
    ValueError: bad arguments, e.g. a token id outside ``[0, n_vocab)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ._native import _core

# Context.eval's hook between micro-batches: (n_done, n_total, logits rows written so far)
UbatchCallback = Callable[[int, int, np.ndarray], None]

LoadError = _core.LoadError
ContextFullError = _core.ContextFullError
StateError = _core.StateError
AbortedError = _core.AbortedError
ComputeError = _core.ComputeError

# The facts the engine owns (csrc/hparams.h), for Python to read rather than copy:
# ARCH: the GGUF architecture (general.architecture and the metadata key prefix);
# LAYER_KINDS: the layer kind names, indexed by the value phi4flash.layer_types stores.
ARCH: str = _core.ARCH
LAYER_KINDS: tuple[str, ...] = tuple(_core.LAYER_KINDS)

__all__ = ["Model", "Context", "LoadError", "ContextFullError", "StateError", "AbortedError",
           "ComputeError", "ARCH", "LAYER_KINDS", "UbatchCallback"]

_KV_TYPES = ("f16", "f32", "bf16")


class Model:
    """A phi4flash GGUF loaded for inference.

    Weights stay in the memory-mapped file when the CPU holds them (no second copy);
    otherwise they are streamed into the device buffer. Every hparam, tensor name, shape and
    type is checked at load time.

    Args:
        path: the GGUF file.
        device: ``"auto"`` (a GPU when the installed ggml has one, else the CPU), ``"cpu"``,
            or a ggml device name such as ``"CUDA0"``.
        n_gpu_layers: with a GPU, how many layers to place there (which ones:
            :meth:`gpu_layers`); ``-1`` places every layer and the output there too, ``0`` keeps
            everything on the CPU.
        use_mmap: map the file instead of reading it into memory.
        use_extra_bufts: let the CPU backend re-lay out (repack) the quantized matrices it has
            faster kernels for (Q4_0, Q8_0, ... on AVX2): a private copy of those tensors
            instead of the mapped pages, about 1.5-2x faster quantized prefill.

    Raises:
        LoadError: missing/truncated/corrupt file, wrong magic, another architecture, a missing
            or misshapen tensor, an absurd hyper-parameter.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        device: str = "auto",
        n_gpu_layers: int = -1,
        use_mmap: bool = True,
        use_extra_bufts: bool = True,
    ) -> None:
        self._m = _core.Model(
            os.fspath(path),
            device=device,
            n_gpu_layers=int(n_gpu_layers),
            use_mmap=bool(use_mmap),
            use_extra_bufts=bool(use_extra_bufts),
        )

    @property
    def path(self) -> str:
        """The GGUF file this model was loaded from."""
        return self._m.path

    @property
    def n_vocab(self) -> int:
        """Number of token ids (rows of the embedding)."""
        return self._m.n_vocab

    @property
    def n_embd(self) -> int:
        """Hidden size."""
        return self._m.n_embd

    @property
    def n_layer(self) -> int:
        """Number of decoder layers."""
        return self._m.n_layer

    @property
    def n_ctx_train(self) -> int:
        """The trained context length stored in the file."""
        return self._m.n_ctx_train

    @property
    def device(self) -> str:
        """The device the model runs on, e.g. ``"CPU"``."""
        return self._m.device

    def gpu_layers(self, n_gpu_layers: int) -> list[int]:
        """The layers a GPU holds for a given ``n_gpu_layers``, whether or not one is present.

        The last ``n_gpu_layers`` layers when they include the layer that writes the shared KV
        cache and every layer that reads it; otherwise the layers just before the writer, so
        that the cache and its readers stay on the CPU together (never copied between devices).

        Args:
            n_gpu_layers: as for the constructor; ``-1`` means every layer.

        Returns:
            The layer indices, ascending.
        """
        return self._m.gpu_layers(int(n_gpu_layers))

    @property
    def mmapped(self) -> bool:
        """Whether the weights are used straight from the mapped file."""
        return self._m.mmapped

    @property
    def huge_page_bytes(self) -> int:
        """Bytes of the weights copied out of the file (repacked matrices; all of them with
        ``use_mmap=False``) that Linux was asked to back with transparent huge pages (0 on
        other systems, on a GPU, or with ``SAMBAY_HUGE_PAGES=0``). Pages of the mapped file stay
        the page cache's."""
        return self._m.huge_page_bytes

    @property
    def weights_bytes(self) -> int:
        """Bytes of all weight tensors."""
        return self._m.weights_bytes

    @property
    def fingerprint(self) -> str:
        """The weights' identity (hex): a hash of the hparams, every tensor's name, type and
        shape and a sample of its bytes, computed at load. Saved states carry it."""
        return self._m.fingerprint

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters the engine runs with (layer kinds by name, folded λ arrays)."""
        return self._m.hparams()

    def metadata(self) -> dict[str, Any]:
        """Every GGUF metadata key: scalars, strings and arrays (as lists)."""
        return self._m.metadata()

    def metadata_value(self, key: str, default: Any = None) -> Any:
        """One GGUF metadata value, or ``default`` when the key is absent."""
        return self._m.metadata_value(key, default)

    def __repr__(self) -> str:
        return repr(self._m)


class Context:
    """Sequences evaluated on a :class:`Model`: one (``n_seq_max=1``, the default), or up to
    ``n_seq_max`` decoded together by :meth:`decode` (each weight matrix is read once per
    micro-batch for all of them).

    Args:
        model: the model.
        n_ctx: the most positions each sequence holds (``0``: the trained context,
            ``Model.n_ctx_train``).
        n_batch: micro-batch size (rows of all sequences together); longer evals are split
            here, in the engine, with results equal to one batch.
        n_seq_max: number of sequences (ids ``0 .. n_seq_max-1``); each has its own Mamba
            states, sliding-window rings and ``n_ctx`` cells of the shared KV cache.
        n_threads: CPU threads for single-token decoding: ``None`` (default) lets the engine
            choose and adapt the count by timing its steps, within the cores the process may
            run on; ``0``: all those cores; ``N``: exactly ``N``.
        n_threads_batch: the same for steps of several tokens (prompts, several sequences).
        logits_all: return logits for every evaluated token, not only the last one.
        kv_type: ``"f16"`` (default), ``"f32"`` or ``"bf16"`` for the attention caches; the
            Mamba states are always F32.
        yoco: when only the last token's logits are needed, run the cross-decoder on that
            token only (exact; disable only to compare).
        flash_attn: use ggml's fused flash attention (no score matrix of n_ctx x n_batch per
            head: much smaller compute buffers at long contexts; F16 KV then also accumulates
            in F16 on the CPU).

    Raises:
        ValueError: an invalid argument.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 0,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        logits_all: bool = False,
        kv_type: str = "f16",
        yoco: bool = True,
        flash_attn: bool = False,
        n_seq_max: int = 1,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a sambay.engine.Model, got {type(model).__name__}")
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
        if n_batch <= 0:
            raise ValueError(f"n_batch must be positive, got {n_batch}")
        for name, n in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"{name} must be None (adapt) or an integer >= 0, got {n!r}")
        if kv_type not in _KV_TYPES:
            raise ValueError(f"kv_type must be one of {_KV_TYPES}, got {kv_type!r}")
        self.model = model
        self._c = _core.Context(
            model._m,
            n_ctx=int(n_ctx),
            n_batch=int(n_batch),
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            logits_all=bool(logits_all),
            kv_type=kv_type,
            yoco=bool(yoco),
            flash_attn=bool(flash_attn),
            n_seq_max=int(n_seq_max),
        )

    def eval(self, tokens: Union[Sequence[int], np.ndarray], *,
             on_ubatch: Optional[UbatchCallback] = None) -> np.ndarray:
        """Evaluates tokens after the ones already in the context.

        The engine cuts ``tokens`` into micro-batches of up to :attr:`n_batch` (the one place
        that rule lives); the results equal one batch. Between micro-batches it calls
        ``on_ubatch`` and then runs Python's signal handlers, so Ctrl-C (``KeyboardInterrupt``)
        or an exception raised by ``on_ubatch`` stops the call there, with the context holding
        exactly the tokens reported so far (:attr:`n_past`).

        Args:
            tokens: token ids, each in ``[0, n_vocab)``.
            on_ubatch: ``(n_done, n_total, logits)``, called with the GIL held after every
                micro-batch (the last one too): ``n_done`` of the call's ``n_total`` tokens are
                evaluated, and ``logits`` is a view of the rows written so far (with
                ``logits_all`` one per evaluated token, else the last evaluated token's row,
                which the next micro-batch overwrites). With a callback every micro-batch
                computes that last row (one row through the cross-decoder).

        Returns:
            float32 logits of shape ``[n_out, n_vocab]``: ``n_out`` is ``len(tokens)`` with
            ``logits_all``, otherwise 1 (0 for no tokens).

        Raises:
            ValueError: a token id out of range (nothing is evaluated).
            ContextFullError: ``n_past + len(tokens) > n_ctx`` (nothing is evaluated).
            AbortedError: :meth:`cancel` was called (see there for the state it leaves).
            StateError: the context needs :meth:`reset` after a cancel.
            KeyboardInterrupt, or what ``on_ubatch`` raised: unchanged, between micro-batches.

        Thread safety: the GIL is released while the engine computes. Calls on one Context
        from several threads are serialised by a lock inside it (each runs whole, in some
        order); several Contexts on one Model run in parallel.
        """
        return self._c.eval(tokens, on_ubatch=on_ubatch)

    def decode(self, batch: Sequence[tuple[int, Union[Sequence[int], np.ndarray]]]) -> np.ndarray:
        """Evaluates several sequences' tokens together, each after its own earlier tokens.

        Args:
            batch: ``(sequence id, tokens)`` pairs, each sequence at most once. A decode step
                gives one token per sequence; a new prompt may come along in the same call
                (micro-batches take the shortest inputs first, so the decoding sequences wait
                for at most one chunk of it).

        Returns:
            float32 logits, the rows of every pair one after the other: ``len(tokens)`` rows
            with ``logits_all``, else 1 (0 for no tokens).

        Raises:
            ValueError: a sequence id out of range or repeated, a token id out of range.
            ContextFullError: a sequence would exceed ``n_ctx`` (``seq_id`` names it).
            StateError: a sequence needs a reset after a cancel.
            Nothing is evaluated when any of these is raised.
        """
        return self._c.decode([(int(s), t) for s, t in batch])

    def n_outputs(self, n_tokens: int) -> int:
        """Rows of logits an eval of ``n_tokens`` tokens returns: ``n_tokens`` with
        :attr:`logits_all`, else 1 (0 for no tokens)."""
        return self._c.n_outputs(int(n_tokens))

    def check_tokens(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Raises what :meth:`eval` raises for these tokens before evaluating anything
        (``ValueError`` naming the first id outside ``[0, n_vocab)``, ``TypeError`` for
        non-integers): the engine's one token check, for callers that feed tokens in several
        calls and must know before the first."""
        self._c.check_tokens(tokens)

    def check_fits(self, n_positions: int, seq: int = 0) -> None:
        """Raises :class:`ContextFullError` when ``n_positions`` positions would not fit in
        sequence ``seq``: the check :meth:`eval` makes, for callers that evaluate one sequence
        in several calls and must know before the first."""
        self._c.check_fits(int(n_positions), int(seq))

    @property
    def n_past(self) -> int:
        """Positions of sequence 0 evaluated so far (the position of its next token)."""
        return self._c.n_past

    def seq_n_past(self, seq: int) -> int:
        """Positions of sequence ``seq`` evaluated so far."""
        return self._c.seq_n_past(int(seq))

    @property
    def n_seq_max(self) -> int:
        """Number of sequences this context holds."""
        return self._c.n_seq_max

    @property
    def n_ctx(self) -> int:
        """The context size."""
        return self._c.n_ctx

    @property
    def n_batch(self) -> int:
        """The micro-batch size: the most rows one graph computes (``n_batch`` as given, at
        most ``n_ctx``). Schedulers that feed a prompt piece by piece read it here."""
        return self._c.n_batch

    @property
    def n_threads(self) -> int:
        """CPU threads single-token steps run with now (adapted over time when ``None`` was given)."""
        return self._c.n_threads

    @property
    def n_threads_batch(self) -> int:
        """CPU threads steps of several tokens run with now."""
        return self._c.n_threads_batch

    @property
    def threads(self) -> dict[str, dict[str, Any]]:
        """The thread count choice of each step kind, ``"decode"`` (one token) and ``"batch"``.

        Each is a dict: ``adaptive`` (the engine chooses), ``current`` (the count steps run with
        outside probes), ``n_max`` (the most it may choose: the usable cores), ``probes``
        (trials of a neighbouring count so far) and ``switches`` (changes of ``current``).
        """
        return self._c.threads

    @property
    def logits_all(self) -> bool:
        """Whether eval returns logits for every token."""
        return self._c.logits_all

    @property
    def flash_attn(self) -> bool:
        """Whether attention runs through ggml_flash_attn_ext."""
        return self._c.flash_attn

    @property
    def device(self) -> str:
        """The device the context computes on."""
        return self._c.device

    def reset(self) -> None:
        """Forgets every sequence: zero states and caches, ``n_past = 0``."""
        self._c.reset()

    def seq_reset(self, seq: int) -> None:
        """Forgets sequence ``seq`` (its states zeroed, ``n_past = 0``); the others stay."""
        self._c.seq_reset(int(seq))

    def cancel(self) -> None:
        """Stops a running :meth:`eval` (call it from another thread): the graph stops at its
        next node and eval raises :class:`AbortedError`.

        Cut between two micro-batches, the context holds the tokens before the cut (``n_past``
        says how many) and stays usable. Cut inside a micro-batch, its caches are half-written:
        :attr:`needs_reset` is then true and eval raises :class:`StateError` until
        :meth:`reset` or :meth:`load_state`. A cancel made while no eval runs stops the next
        one before it computes anything (:meth:`clear_cancel` drops it).
        """
        self._c.cancel()

    def clear_cancel(self) -> None:
        """Drops a :meth:`cancel` request no eval has consumed yet."""
        self._c.clear_cancel()

    @property
    def needs_reset(self) -> bool:
        """True after a cancel cut a micro-batch in the middle (see :meth:`cancel`)."""
        return bool(self._c.needs_reset)

    def seq_needs_reset(self, seq: int) -> bool:
        """:attr:`needs_reset` of sequence ``seq`` (a cut micro-batch poisons its sequences)."""
        return bool(self._c.seq_needs_reset(int(seq)))

    def save_state(self, seq: int = 0) -> bytes:
        """One sequence's caches and states plus its position, as bytes (see :meth:`load_state`)."""
        return self._c.save_state(int(seq))

    def load_state(self, state: bytes, seq: int = 0, *, tokens: Optional[Sequence[int]] = None) -> None:
        """Restores a state saved by a context of the same model and KV type into sequence
        ``seq`` (any sequence of any such context: prefix reuse across sequences).

        A state names the model it was saved from (:attr:`Model.fingerprint`) and the tokens
        its sequence had evaluated (their count and a hash); with ``tokens``, the state must
        have been saved after exactly those tokens.

        Raises:
            StateError: the state belongs to another model or KV type, does not hold
                ``tokens``, or is corrupt; the sequence is left as it was.
            ContextFullError: the state holds more positions than this context's ``n_ctx``.
        """
        claimed = None if tokens is None else [int(t) for t in tokens]
        self._c.load_state(bytes(state), int(seq), tokens=claimed)

    @property
    def huge_page_bytes(self) -> int:
        """Bytes of this context's caches and states that Linux was asked to back with
        transparent huge pages (see :attr:`Model.huge_page_bytes`)."""
        return self._c.huge_page_bytes

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes per part, all sequences: mamba_conv, mamba_ssm, swa_kv, full_kv, compute,
        weights; ``per_sequence`` (one sequence's share of the four caches) and ``n_seq_max``."""
        return dict(self._c.memory_breakdown())

    def op_profile(self) -> dict[str, tuple[int, float]]:
        """Where the engine's time went, per kind of graph node: ``{"MUL_MAT ffn_up.weight":
        (nodes, seconds), "SOFT_MAX": ..., "CUSTOM attn_scores_cpu": ...}``, summed over every
        step since the context was made or :meth:`reset_op_profile`.

        Only a context created with the environment variable ``SAMBAY_PROFILE=1`` records
        (empty otherwise). It then runs its graphs one node at a time, which adds a dispatch per
        node: the figures say where the time goes, not how fast an unprofiled step is
        (``python -m bench.op_profile`` prints them as a table)."""
        return {k: (int(n), float(s)) for k, (n, s) in self._c.op_profile().items()}

    def reset_op_profile(self) -> None:
        """Start :meth:`op_profile`'s sums afresh."""
        self._c.reset_op_profile()

    def __repr__(self) -> str:
        return (
            f"<sambay.engine.Context n_ctx={self.n_ctx} n_batch={self.n_batch} "
            f"n_past={self.n_past} device={self.device}>"
        )
