"""Slots: the N sequences of one context (continuous batching: their evaluations run as one
engine step, see :mod:`sambay.batch`), a bounded wait queue, and generation in threads.

The event loop never runs the engine. A request takes a free slot (or waits in a queue of at
most ``max_queue`` requests; beyond that :class:`QueueFull`), then its work runs in that slot's
thread and sends what it yields back through an asyncio queue. Stopping a job (the client went
away, the server shuts down) sets its :class:`StopRequest`: checked between tokens
(:class:`SlotLlama`), and passed to the engine (``Llama.cancel()``), which stops a running
prefill or decode step at its next graph node. A slot returns to the pool only when its thread
is done.

Everything but the worker threads' bodies runs on the event loop thread, so the counters and
queues need no locks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Generator, Optional, Sequence

from ..engine import AbortedError
from ..llama import Llama, Timings


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full (HTTP 503)."""


class GenerationCancelled(Exception):
    """A job's stop request was set while it generated."""


class ShuttingDown(Exception):
    """The server is stopping: running generations end and queued requests are refused (503)."""


class StopRequest:
    """A job's request to stop, settable from any thread (also from a signal handler).

    While the job runs, :meth:`set` also calls the slot's ``Llama.cancel()``, so the engine
    stops mid-graph (a long prefill does not run to its end); once the job is over it only
    records the request. :meth:`finish` (the slot thread, when the job ends) drops an engine
    cancel that arrived after the job's last eval, so it cannot stop the slot's next job.
    """

    def __init__(self, llm: "SlotLlama") -> None:
        self._llm = llm
        self._event = threading.Event()
        self._lock = threading.RLock()  # reentrant: a signal handler may interrupt set()
        self._running = True

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            if self._running:
                self._llm.cancel()

    def is_set(self) -> bool:
        return self._event.is_set()

    def finish(self) -> None:
        with self._lock:
            self._running = False
            self._llm.clear_cancel()


class SlotLlama(Llama):
    """A :class:`sambay.Llama` whose ``generate`` stops between tokens once ``stop_request``
    is set (the engine itself is stopped by :class:`StopRequest`, through :meth:`cancel`).

    The check comes before asking the engine for the next token, so no decode step is spent
    after a cancellation is seen. ``on_first_token`` is called once the prompt is evaluated
    and the first token sampled (the server answers a streaming request's headers then).
    """

    stop_request: Optional[StopRequest] = None
    on_first_token: Optional[Callable[[], None]] = None

    def clear_cancel(self) -> None:
        """Drops a :meth:`cancel` that no eval has consumed."""
        self._ctx.clear_cancel()

    def generate(self, tokens: Any, **kwargs: Any) -> Generator[int, None, None]:
        inner = super().generate(tokens, **kwargs)
        first = True
        try:
            while True:
                if self.stop_request is not None and self.stop_request.is_set():
                    raise GenerationCancelled()
                try:
                    token = next(inner)
                except StopIteration:
                    return
                if first and self.on_first_token is not None:
                    self.on_first_token()
                first = False
                yield token
        finally:
            inner.close()


_ITEM, _STARTED, _END, _ERROR = range(4)


class Job:
    """One request's work on a slot: an async iterator of what the work yields.

    ``started()`` waits until the first token exists (or the work ended or failed), so errors
    found before generation (a prompt longer than the context, a bad template) can still get an
    HTTP error status. Leaving the iteration early (or ``cancel()``) sets the stop request.
    """

    def __init__(self, stop: StopRequest) -> None:
        self.stop_request = stop
        self._q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._buffer: list[tuple[int, Any]] = []
        self._started = False

    def cancel(self) -> None:
        self.stop_request.set()

    async def started(self) -> None:
        """Returns once the first token is sampled or the work has ended; raises its error."""
        while not self._started:
            kind, value = await self._q.get()
            if kind == _STARTED:
                self._started = True
            elif kind == _ERROR:
                self._started = True
                raise value
            else:
                self._buffer.append((kind, value))
                if kind == _END:
                    self._started = True

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                if self._buffer:
                    kind, value = self._buffer.pop(0)
                else:
                    kind, value = await self._q.get()
                if kind == _ITEM:
                    yield value
                elif kind == _ERROR:
                    raise value
                elif kind == _END:
                    return
        finally:
            self.stop_request.set()  # harmless when the work is already done

    async def result(self) -> Any:
        """The single item a non-streaming job yields (``None`` if it was cancelled)."""
        out = None
        async for item in self:
            out = item
        return out


class SlotPool:
    """``len(llamas)`` slots that run jobs in their own threads, with a bounded wait queue.

    Args:
        llamas: the contexts (usually :meth:`SlotLlama.from_model` over one model).
        max_queue: how many requests may wait for a slot; more get :class:`QueueFull`.
    """

    def __init__(self, llamas: Sequence[SlotLlama], *, max_queue: int) -> None:
        if not llamas:
            raise ValueError("a pool needs at least one context")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.llamas = list(llamas)
        self.max_queue = max_queue
        self._free = collections.deque(self.llamas)
        self._waiters: collections.deque[asyncio.Future[SlotLlama]] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=len(self.llamas), thread_name_prefix="sambay-slot")
        self._running: set[StopRequest] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.shutting_down = False
        self.n_rejected = 0
        self.n_cancelled = 0
        self.totals = Timings()  # summed over finished jobs (/metrics)

    @classmethod
    def of_sequences(cls, base: SlotLlama, *, max_queue: int, seed: Optional[int] = None) -> "SlotPool":
        """One slot per sequence of ``base``'s context (``base.n_seq_max`` of them): the
        slots' evaluations run as one engine step (continuous batching). ``seed``: slot i's
        sampler gets ``seed + i``."""
        n = base.n_seq_max
        if n == 1:
            return cls([base], max_queue=max_queue)
        return cls([base.sequence(i, seed=None if seed is None else seed + i) for i in range(n)],
                   max_queue=max_queue)

    # counters, read by /health and the tests
    @property
    def n_slots(self) -> int:
        return len(self.llamas)

    @property
    def n_busy(self) -> int:
        return len(self.llamas) - len(self._free)

    @property
    def n_waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def llama(self) -> SlotLlama:
        """The first slot: what the app asks about the model (tokenizer, template, n_ctx)."""
        return self.llamas[0]

    @property
    def tokens_evaluated(self) -> int:
        """Tokens every context has run through the engine (prompt and decode steps)."""
        return sum(llm.n_tokens_evaluated for llm in self.llamas)

    async def acquire(self, gone: Optional[asyncio.Event] = None,
                      prompt_tokens: Optional[Sequence[int]] = None) -> SlotLlama:
        """A free slot, after waiting in the queue if need be. With ``prompt_tokens``, the
        free slot that already holds the longest part of that prompt (a conversation's next
        turn lands where its history is).

        Raises:
            QueueFull: no slot is free and ``max_queue`` requests already wait.
            GenerationCancelled: ``gone`` was set (the client left) while waiting.
            ShuttingDown: the server is stopping.
        """
        self._loop = asyncio.get_running_loop()
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        if self._free:
            if prompt_tokens is not None and len(self._free) > 1:
                best = max(self._free, key=lambda llm: llm.cached_prefix(prompt_tokens))
                self._free.remove(best)
                return best
            return self._free.popleft()
        if self.n_waiting >= self.max_queue:
            self.n_rejected += 1
            raise QueueFull(f"the server is busy: {self.n_slots} requests running and {self.max_queue} "
                            "waiting (its limit); retry later")
        fut: asyncio.Future[SlotLlama] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        gone_task = asyncio.ensure_future(gone.wait()) if gone is not None else None
        try:
            waits: set[asyncio.Future[Any]] = {fut} if gone_task is None else {fut, gone_task}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if gone_task is not None:
                gone_task.cancel()
            if not fut.done():
                fut.cancel()
        if fut.cancelled():
            self.n_cancelled += 1
            raise GenerationCancelled()
        return fut.result()  # raises ShuttingDown when the server stops first

    async def submit(self, work: Callable[[SlotLlama], Any], *, stream: bool, gone: Optional[asyncio.Event] = None,
                     prompt_tokens: Optional[Sequence[int]] = None, conversation: Optional[str] = None) -> "Job":
        """:meth:`acquire` then :meth:`start` (the :class:`~sambay.server.backend.Backend`
        interface; ``conversation`` is unused: one pool's choice of slot is by prompt prefix).

        Raises:
            QueueFull, GenerationCancelled, ShuttingDown: as :meth:`acquire`.
        """
        llm = await self.acquire(gone, prompt_tokens)
        return self.start(llm, work, stream=stream)

    def take(self, llm: SlotLlama) -> bool:
        """Takes the slot ``llm`` if it is free (for work on that very slot, e.g. saving its
        state; hand it to :meth:`start`, which returns it). False when it is busy."""
        if llm not in self._free or self.shutting_down:
            return False
        self._free.remove(llm)
        return True

    def _release(self, llm: SlotLlama) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(llm)
                return
        self._free.append(llm)

    def start(self, llm: SlotLlama, work: Callable[[SlotLlama], Any], *, stream: bool) -> Job:
        """Runs ``work(llm)`` in the slot's thread; the slot returns to the pool afterwards.

        ``work`` returns an iterator of items when ``stream``, else one item.
        """
        loop = asyncio.get_running_loop()
        stop = StopRequest(llm)
        job = Job(stop)
        self._running.add(stop)

        def put(kind: int, value: Any = None) -> None:
            try:
                loop.call_soon_threadsafe(job._q.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: the server is shutting down
                stop.set()

        def run() -> None:
            llm.last_timings = Timings()  # a job that fails before generating counts nothing
            llm.stop_request = stop
            llm.on_first_token = lambda: put(_STARTED)
            try:
                if stream:
                    it = iter(work(llm))
                    try:
                        for item in it:
                            put(_ITEM, item)
                            if stop.is_set():
                                raise GenerationCancelled()
                    finally:
                        close = getattr(it, "close", None)
                        if close is not None:
                            close()
                else:
                    put(_ITEM, work(llm))
                put(_END)
            except (GenerationCancelled, AbortedError) as err:
                if isinstance(err, AbortedError) and not stop.is_set():
                    put(_ERROR, err)  # someone else's cancel: not this job's stop
                elif self.shutting_down:  # tell the client, rather than end as if complete
                    put(_ERROR, ShuttingDown("the server is shutting down"))
                else:
                    put(_END)
                    try:
                        loop.call_soon_threadsafe(self._count_cancel)
                    except RuntimeError:
                        pass
            except BaseException as err:  # reported to the request, never kills the slot
                put(_ERROR, err)
            finally:
                stop.finish()
                llm.stop_request = None
                llm.on_first_token = None

        def done(_: Any) -> None:
            self._running.discard(stop)
            self._add_timings(llm.last_timings)
            self._release(llm)

        fut = loop.run_in_executor(self._executor, run)
        fut.add_done_callback(done)
        return job

    def _add_timings(self, t: Timings) -> None:
        for f in dataclasses.fields(Timings):
            setattr(self.totals, f.name, getattr(self.totals, f.name) + getattr(t, f.name))

    def _count_cancel(self) -> None:
        self.n_cancelled += 1

    def shutdown(self) -> None:
        """Starts stopping: running generations end at their next token (their clients get a
        "shutting down" error) and queued and new requests get :class:`ShuttingDown`.
        Callable from any thread (e.g. a signal handler)."""
        self.shutting_down = True
        for stop in list(self._running):
            stop.set()
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fail_waiters)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _fail_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ShuttingDown("the server is shutting down"))

    def close(self) -> None:
        """Cancels running jobs and waits for the slot threads."""
        self.shutting_down = True
        for stop in list(self._running):
            stop.set()
        self._executor.shutdown(wait=True)
