"""What the HTTP app needs from whatever generates: the :class:`Backend` interface.

Two backends exist: :class:`~sambay.server.pool.SlotPool` (the slots of one process, ``sambay
serve``) and :class:`sambay.ray_serve.RayBackend` (replicas of that pool on a Ray cluster,
``sambay serve --ray``). The routes in :mod:`sambay.server.app` are written once against this
interface. A request's *conversation key* (:func:`conversation_key`) lets a backend that has
several places to run a request send the turns of one conversation where its state is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

__all__ = ["Backend", "ReplicaLost", "SESSION_HEADER", "conversation_key", "conversation_start"]

# the request header that names a conversation (the ``user`` field does too)
SESSION_HEADER = "x-session-id"


class ReplicaLost(Exception):
    """The replica running a request stopped (it was killed, or its node went away); the
    request may be sent again (HTTP 503)."""


class Backend(Protocol):
    """Runs the app's work. ``work(llm)`` returns one response, or with ``stream`` an iterator
    of chunks; it runs where a :class:`~sambay.server.pool.SlotLlama` is, so it must be
    picklable for a backend that runs it in another process (closures over plain data are)."""

    max_queue: int

    @property
    def llama(self) -> Any:
        """A Llama of the served model for what the app itself asks: tokenizer, chat template,
        sampling defaults, ``n_ctx()``, ``n_vocab()``."""

    @property
    def n_slots(self) -> int: ...

    @property
    def n_busy(self) -> int: ...

    @property
    def n_waiting(self) -> int: ...

    async def submit(self, work: Callable[[Any], Any], *, stream: bool, gone: Optional[asyncio.Event] = None,
                     prompt_tokens: Optional[Sequence[int]] = None, conversation: Optional[str] = None) -> Any:
        """Starts ``work`` and returns its job (``started()``, ``result()``, ``cancel()``,
        async iteration: see :class:`~sambay.server.pool.Job`).

        Raises:
            QueueFull: no capacity now. ShuttingDown: the server is stopping.
            GenerationCancelled: ``gone`` was set while the request waited.
        """

    def shutdown(self) -> None:
        """Starts stopping (callable from a signal handler)."""

    def close(self) -> None:
        """Stops and waits (the app's shutdown)."""


def conversation_key(headers: Mapping[str, str], user: Optional[str], start: Any) -> str:
    """The key naming a request's conversation: the ``X-Session-Id`` header, else the
    request's ``user`` field, else a hash of how the conversation starts (``start``: for a chat,
    its messages up to the first user message; for a completion, the head of its prompt), which
    later turns repeat."""
    session = headers.get(SESSION_HEADER)
    if session:
        return "session:" + session
    if user:
        return "user:" + user
    digest = hashlib.sha256(json.dumps(start, sort_keys=True, default=str).encode()).hexdigest()
    return "prefix:" + digest[:32]


def conversation_start(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A chat's messages up to and including its first user message (what every later turn of
    the same conversation starts with)."""
    for i, m in enumerate(messages):
        if m.get("role") == "user":
            return list(messages[:i + 1])
    return list(messages)
