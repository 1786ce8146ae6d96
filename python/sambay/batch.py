"""Continuous batching: many sequences of one engine context, decoded together.

:class:`SharedContext` owns an engine :class:`~sambay.engine.Context` of ``n_seq_max``
sequences. Each sequence is driven through a :class:`SequenceContext`, which has the part of the
Context interface a :class:`sambay.Llama` uses, so every Llama feature (prefix reuse, stop
strings, logprobs, chat, reasoning split) works per sequence unchanged. ``eval`` calls made by
different threads at about the same time become one engine ``decode`` step: the weights are
read once per step for every sequence in it.

When a step runs: as soon as every *active* sequence (one that evaluated recently and has not
gone idle) has handed in its tokens, or ``max_wait`` seconds after the first one did. A
sequence that misses that deadline stops counting as active until its next eval, so a thread
that went away slows the others once, not on every step. A new prompt is fed by
:meth:`SequenceContext.eval` in chunks of the engine's micro-batch size (``Context.n_batch``),
one chunk per step, so the decoding sequences are held back by at most one chunk per step
while it prefills.

Faults stay with their sequence: a step whose batch the engine refuses (one sequence over its
context, say) is re-run one sequence at a time, so only the faulty one gets the error.
:meth:`SequenceContext.cancel` stops one sequence at its next step; the others go on.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from .engine import AbortedError, Context, ContextFullError, StateError, UbatchCallback

__all__ = ["SharedContext", "SequenceContext"]

Tokens = Union[Sequence[int], np.ndarray]


class SharedContext:
    """The scheduler over one multi-sequence engine context.

    Args:
        ctx: an engine context with ``n_seq_max`` sequences.
        max_wait: seconds a step waits for active sequences that have not handed in their
            tokens yet (the time a sampler needs between two tokens is far less).
    """

    def __init__(self, ctx: Context, *, max_wait: float = 0.05) -> None:
        self.ctx = ctx
        self.max_wait = max_wait
        self._cv = threading.Condition()
        self._pending: dict[int, np.ndarray] = {}
        self._results: dict[int, Any] = {}
        self._active: set[int] = set()
        self._cancelled: set[int] = set()
        self._busy = False
        self.steps = 0            # engine decode steps run
        self.rows = 0             # sequence entries over all steps (rows / steps = batch size)

    @property
    def n_seq_max(self) -> int:
        return self.ctx.n_seq_max

    def sequence(self, seq: int) -> "SequenceContext":
        """The view of sequence ``seq`` (``0 .. n_seq_max-1``)."""
        if not 0 <= seq < self.n_seq_max:
            raise ValueError(f"sequence id {seq} is out of range (n_seq_max is {self.n_seq_max})")
        return SequenceContext(self, seq)

    # ------------------------------------------------------------------ the step

    def eval(self, seq: int, tokens: np.ndarray) -> np.ndarray:
        """Evaluates ``tokens`` of sequence ``seq`` in the next step; blocks until it ran."""
        with self._cv:
            if seq in self._cancelled:
                self._cancelled.discard(seq)
                raise AbortedError(f"sequence {seq}: evaluation cancelled")
            self._active.add(seq)
            self._pending[seq] = tokens
            self._cv.notify_all()
            deadline = time.monotonic() + self.max_wait
            while True:
                if seq in self._results:
                    out = self._results.pop(seq)
                    if isinstance(out, BaseException):
                        raise out
                    return out
                if seq in self._cancelled and seq in self._pending:  # not taken into a step yet
                    del self._pending[seq]
                    self._cancelled.discard(seq)
                    self._cv.notify_all()
                    raise AbortedError(f"sequence {seq}: evaluation cancelled")
                now = time.monotonic()
                if not self._busy and self._pending and (self._active <= self._pending.keys() or now >= deadline):
                    if now >= deadline:
                        self._active &= self._pending.keys()  # the late ones count again when they come
                    self._step()
                    continue
                self._cv.wait(None if self._busy else max(1e-4, deadline - now))

    def _step(self) -> None:
        """Runs the pending entries as one engine step (called with the lock held; releases it
        while the engine computes)."""
        batch = list(self._pending.items())
        self._pending.clear()
        self._busy = True
        self._cv.release()
        try:
            results = self._decode(batch)
        finally:
            self._cv.acquire()
            self._busy = False
            self.steps += 1
            self.rows += len(batch)
            self._results.update(results)
            self._cv.notify_all()

    def _decode(self, batch: list[tuple[int, np.ndarray]]) -> dict[int, Any]:
        n_rows = [self.ctx.n_outputs(len(t)) for _, t in batch]
        try:
            logits = self.ctx.decode(batch)
        except (ContextFullError, StateError, ValueError) as err:
            if len(batch) == 1:
                return {batch[0][0]: err}
            # one sequence's fault: run them one by one, so it stays that sequence's
            out: dict[int, Any] = {}
            for entry in batch:
                out.update(self._decode([entry]))
            return out
        except BaseException as err:  # noqa: BLE001 - every waiting sequence hears of it
            return {s: err for s, _ in batch}
        out, r = {}, 0
        for (s, _), n in zip(batch, n_rows):
            out[s] = logits[r:r + n]
            r += n
        return out

    def idle(self, seq: int) -> None:
        """Sequence ``seq`` evaluates nothing for a while (its generation ended): steps stop
        waiting for it."""
        with self._cv:
            self._active.discard(seq)
            self._cv.notify_all()

    def cancel(self, seq: int) -> None:
        """Sequence ``seq``'s next (or waiting) eval raises AbortedError; the others go on."""
        with self._cv:
            self._cancelled.add(seq)
            self._cv.notify_all()

    def clear_cancel(self, seq: int) -> None:
        with self._cv:
            self._cancelled.discard(seq)


class SequenceContext:
    """One sequence of a :class:`SharedContext`, with the engine Context's interface for a
    single sequence (what :class:`sambay.Llama` calls)."""

    def __init__(self, shared: SharedContext, seq: int) -> None:
        self.shared = shared
        self.seq = seq

    # evaluation
    def eval(self, tokens: Tokens, *, on_ubatch: Optional[UbatchCallback] = None) -> np.ndarray:
        """:meth:`Context.eval <sambay.engine.Context.eval>` of this sequence, fed one chunk of
        the engine's micro-batch size per step (the others' decode tokens go along in each);
        ``on_ubatch`` is called after every chunk as the engine calls it after every
        micro-batch, and an exception from it (or a cancel) stops the feeding there."""
        ids = np.asarray(tokens, dtype=np.int64)
        ctx = self.shared.ctx
        step, total = ctx.n_batch, len(ids)
        if on_ubatch is None and total <= step:
            return self.shared.eval(self.seq, ids)
        out = np.empty((ctx.n_outputs(total), ctx.model.n_vocab), dtype=np.float32)
        for done in range(0, total, step):
            rows = self.shared.eval(self.seq, ids[done:done + step])
            end = min(total, done + step)
            if ctx.logits_all:
                out[done:end] = rows
            else:
                out[0] = rows[-1]
            if on_ubatch is not None:
                on_ubatch(end, total, out[:end] if ctx.logits_all else out)
        return out

    def check_fits(self, n_positions: int) -> None:
        self.shared.ctx.check_fits(n_positions, seq=self.seq)

    def idle(self) -> None:
        self.shared.idle(self.seq)

    # cancellation
    def cancel(self) -> None:
        self.shared.cancel(self.seq)

    def clear_cancel(self) -> None:
        self.shared.clear_cancel(self.seq)

    @property
    def needs_reset(self) -> bool:
        return self.shared.ctx.seq_needs_reset(self.seq)

    # memory and state of this sequence
    def reset(self) -> None:
        self.shared.ctx.seq_reset(self.seq)

    def save_state(self) -> bytes:
        return self.shared.ctx.save_state(self.seq)

    def load_state(self, state: bytes, *, tokens: Optional[Sequence[int]] = None) -> None:
        self.shared.ctx.load_state(state, self.seq, tokens=tokens)

    @property
    def n_past(self) -> int:
        return self.shared.ctx.seq_n_past(self.seq)

    # the context's properties
    @property
    def n_ctx(self) -> int:
        return self.shared.ctx.n_ctx

    @property
    def n_batch(self) -> int:
        return self.shared.ctx.n_batch

    @property
    def device(self) -> str:
        return self.shared.ctx.device

    def memory_breakdown(self) -> dict[str, int]:
        return self.shared.ctx.memory_breakdown()

    def __getattr__(self, name: str) -> Any:  # n_threads, logits_all, ...: the context's
        return getattr(self.shared.ctx, name)
