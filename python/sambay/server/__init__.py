"""``sambay serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model.

Install the extra first: ``pip install "sambay[server]"``. The pieces: :mod:`.settings` (options,
importable without FastAPI), :mod:`.schemas` (pydantic bodies), :mod:`.pool` (slots, queue,
threads, cancellation) and :mod:`.app` (routes, errors, middleware). This module loads the model
once, builds ``parallel`` contexts over it and runs uvicorn.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from typing import Any

from ..errors import MissingDependencyError
from .settings import ServerSettings, add_arguments, from_args

__all__ = ["MissingDependencyError", "ServerSettings", "add_arguments", "app_options", "from_args", "listen_socket",
           "load_pool", "memory_report", "require_dependencies", "serve"]

log = logging.getLogger("sambay.server")

_REQUIRED = ("fastapi", "uvicorn", "pydantic")


def require_dependencies() -> None:
    """Raises :class:`MissingDependencyError` naming the install command if FastAPI, uvicorn
    or pydantic cannot be imported."""
    for name in _REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise MissingDependencyError(
                f"the server needs FastAPI and uvicorn (missing: {name}): "
                f"pip install \"sambay[server]\"") from err


def load_pool(settings: ServerSettings) -> Any:
    """Loads the model and makes one context of ``settings.parallel`` sequences, one slot
    per sequence: their decode steps run as one batch (continuous batching, see
    :mod:`sambay.batch`).

    Returns:
        a :class:`sambay.server.pool.SlotPool`.

    Raises:
        sambay.LoadError: the model file is missing or invalid.
    """
    from ..engine import LoadError
    from ..gguf_metadata import check_model_file
    from .pool import SlotLlama, SlotPool

    check_model_file(settings.model, LoadError)
    n = settings.parallel
    base = SlotLlama(settings.model, n_ctx=settings.n_ctx, n_batch=settings.n_batch,
                     n_threads=settings.n_threads, n_threads_batch=settings.n_threads_batch,
                     device=settings.device,
                     n_gpu_layers=settings.n_gpu_layers, n_seq_max=n, seed=settings.seed, verbose=False,
                     flash_attn=settings.flash_attn, type_k=settings.type_k, type_v=settings.type_v,
                     use_mmap=settings.use_mmap, chat_template=settings.chat_template)
    return SlotPool.of_sequences(base, max_queue=settings.max_queue, seed=settings.seed)


def app_options(settings: ServerSettings) -> dict[str, Any]:
    """The keywords of :func:`sambay.server.app.create_app` that ``settings`` gives (the same
    for ``sambay serve`` and its Ray ingress)."""
    return dict(model_alias=settings.alias, api_key=settings.api_key, max_tokens=settings.max_tokens,
                max_body_bytes=settings.max_body_bytes, reasoning_format=settings.reasoning_format,
                reasoning_budget=settings.reasoning_budget, cors_origins=settings.cors_origins,
                keep_alive=settings.keep_alive, metrics=settings.metrics)


def memory_report(pool: Any) -> str:
    """One line: the weights (loaded once) and the caches of the sequences."""
    mib = 2**20
    llm = pool.llama
    parts = llm.memory_breakdown()
    caches = {k: parts[k] for k in ("mamba_conv", "mamba_ssm", "swa_kv", "full_kv")}
    weights = llm.model.weights_bytes
    detail = ", ".join(f"{k} {v / mib:.1f}" for k, v in caches.items())
    total = weights + sum(caches.values()) + parts["compute"]
    return (f"{os.path.basename(llm.model_path)} on {llm.device}: weights {weights / mib:.1f} MiB, "
            f"{pool.n_slots} sequence(s) x n_ctx {llm.n_ctx()}: {parts['per_sequence'] / mib:.1f} MiB each "
            f"({detail} MiB in all), compute {parts['compute'] / mib:.1f} MiB; {total / mib:.1f} MiB in all")


def serve(settings: ServerSettings) -> int:
    """Loads the model and serves until interrupted (Ctrl-C / SIGTERM).

    Raises:
        MissingDependencyError: the ``server`` extra is not installed.
        OSError: the address cannot be listened on (checked before the model is loaded).
        sambay.LoadError: the model cannot be loaded.
    """
    require_dependencies()
    from .app import create_app, make_server

    if settings.metrics:
        from .metrics import require_prometheus

        require_prometheus()

    from ..engine import LoadError
    from ..gguf_metadata import check_model_file

    check_model_file(settings.model, LoadError)
    sock = listen_socket(settings.host, settings.port)  # a busy port fails before the long load
    try:
        pool = load_pool(settings)
        print(f"sambay serve: {memory_report(pool)}", file=sys.stderr)
        app = create_app(pool, **app_options(settings))
        port = sock.getsockname()[1]
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        auth = "API key required" if settings.api_key else "no API key"
        print(f"sambay serve: OpenAI API at http://{host}:{port}/v1 ({auth}, "
              f"{pool.n_slots} slot(s), queue of {pool.max_queue})", file=sys.stderr, flush=True)
        server = make_server(app, host=settings.host, port=port, log_level=settings.log_level,
                             timeout_graceful_shutdown=5)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a clean stop
            pass
    finally:
        sock.close()
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (uvicorn listens on it).

    Raises:
        OSError: the address cannot be bound, e.g. "cannot listen on 127.0.0.1:8000: Address
            already in use".
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock
