"""Server-sent events for the streaming endpoints, with keep-alive comments.

A streaming request may wait minutes before its first token: in the queue for a slot, then in
the prefill of a long prompt. Proxies and load balancers close a connection that carries no
bytes for a while (nginx's default read timeout is 60 s), so while nothing else is sent the
stream carries an SSE comment line (``: keep-alive``) every ``interval`` seconds. Clients skip
comment lines (the SSE format says so; the OpenAI SDK and browsers' ``EventSource`` do).

The HTTP status is chosen as late as the interval allows: an error that comes before the first
keep-alive is due (a full queue, a prompt longer than the context) still gets its own status;
once a keep-alive has gone out the status is 200 and a later error is reported in the stream, as
OpenAI reports errors after the first chunk.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from .backend import Backend
from .pool import Job, SlotLlama

KEEP_ALIVE = ": keep-alive\n\n"


async def start_stream(pool: Backend, work: Callable[[SlotLlama], Any], gone: asyncio.Event,
                       prompt_tokens: Optional[Sequence[int]], jobs: list[Job],
                       conversation: Optional[str] = None) -> Job:
    """Submits ``work`` to the backend (which waits for a slot) and waits for its first token
    (or its end).

    The job is appended to ``jobs`` as soon as it exists, so a disconnect can cancel it.

    Raises:
        QueueFull, ShuttingDown, GenerationCancelled: from :meth:`Backend.submit`.
        Exception: the work's error before its first token.
    """
    job = await pool.submit(work, stream=True, gone=gone, prompt_tokens=prompt_tokens,
                            conversation=conversation)
    jobs.append(job)
    if gone.is_set():
        job.cancel()
    await job.started()
    return job


async def _until_done(fut: "asyncio.Future[Any]", interval: Optional[float]) -> AsyncIterator[str]:
    """:data:`KEEP_ALIVE` every ``interval`` seconds until ``fut`` is done (never cancels it);
    ``interval`` None or 0: no comments."""
    while not fut.done():
        await asyncio.wait({fut}, timeout=interval or None)
        if not fut.done():
            yield KEEP_ALIVE


async def sse_events(ready: "asyncio.Future[Job]", *, interval: Optional[float],
                     encode: Callable[[Any], str], encode_error: Callable[[BaseException], str],
                     cleanup: Callable[[], None]) -> AsyncIterator[str]:
    """The event stream of a request: keep-alive comments until ``ready`` (from
    :func:`start_stream`) is done, then ``data: encode(chunk)`` per chunk of its job (with
    keep-alives between chunks that are slow to come), ``data: [DONE]`` at the end, or
    ``data: encode_error(err)`` after an error. ``cleanup`` runs when the stream ends, however
    it ends (the client left: the server cancels this generator)."""
    if not ready.done():  # nobody else retrieves its error once the client has gone
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
    pending: Optional[asyncio.Future[Any]] = None
    try:
        async for comment in _until_done(ready, interval):
            yield comment
        chunks = ready.result().__aiter__()
        while True:
            pending = asyncio.ensure_future(chunks.__anext__())
            async for comment in _until_done(pending, interval):
                yield comment
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            yield "data: " + encode(chunk) + "\n\n"
    except Exception as err:  # headers are sent: report in the stream, as OpenAI does
        yield "data: " + encode_error(err) + "\n\n"
        return
    finally:
        if pending is not None:
            pending.cancel()  # the job's iterator then sets its stop request
        cleanup()
    yield "data: [DONE]\n\n"
