"""The server's settings and their command-line options (no FastAPI import here, so
``sambay --help`` and ``sambay serve --help`` work without the ``server`` extra)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .._compat import cache_type
from .._options import (add_chat_template_arguments, add_engine_arguments, add_thread_arguments, chat_template,
                        engine_kwargs, thread_kwargs)
from ..chat import check_template
from ..reasoning import REASONING_FORMATS, check_reasoning_format, resolve_budget

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
# seconds between SSE keep-alive comments: sse-starlette's (llama-cpp-python's server) default
# ping interval, well under the 60 s read timeout of common proxies (nginx)
DEFAULT_KEEP_ALIVE_SECONDS = 15.0


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``sambay serve`` is started with; fixed for the server's lifetime.

    Args:
        model: the GGUF file (the only file the server ever loads).
        host, port: where to listen (loopback by default: nothing else can reach it).
        n_ctx: context length of each slot.
        parallel: slots, i.e. sequences of one context whose decode steps run together.
        max_queue: requests that may wait for a free slot; more are answered 503.
        api_key: when set, every request must carry ``Authorization: Bearer <key>``.
        model_alias: the model name reported by ``/v1/models`` and in responses
            (default: the file name).
        max_tokens: the largest ``max_tokens`` a request may ask for (default: ``n_ctx``).
        max_body_bytes: the largest request body accepted (413 beyond).
        reasoning_format: ``"deepseek"`` (the ``<think>`` trace in ``reasoning_content``) or
            ``"none"`` (left in ``content``), for chat requests that do not say.
        reasoning_budget: trace budget in tokens for chat requests that give none.
        cors_origins: origins browsers may call the API from (``"*"``: any; none by default).
        keep_alive: seconds between SSE keep-alive comments while a stream has nothing to
            send (queued, prefilling); 0: none.
        metrics: serve Prometheus metrics at ``GET /metrics`` (needs prometheus-client).
        flash_attn, type_k, type_v, use_mmap: :class:`sambay.Llama`'s (``-fa``, ``-ctk``,
            ``-ctv``, ``--no-mmap``).
        chat_template: :class:`sambay.Llama`'s ``chat_template`` (a built-in name or Jinja
            text; None: the model file's).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: Optional[int] = None
    n_threads_batch: Optional[int] = None
    n_gpu_layers: int = -1
    device: str = "auto"
    parallel: int = 1
    max_queue: int = 16
    api_key: Optional[str] = None
    model_alias: Optional[str] = None
    max_tokens: Optional[int] = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    seed: Optional[int] = None
    log_level: str = "info"
    reasoning_format: str = "deepseek"
    reasoning_budget: Optional[int] = None
    cors_origins: tuple[str, ...] = ()
    keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS
    metrics: bool = False
    flash_attn: bool = False
    type_k: Optional[str] = None
    type_v: Optional[str] = None
    use_mmap: bool = True
    chat_template: Optional[str] = None

    def __post_init__(self) -> None:
        for name, minimum in (("port", 0), ("n_ctx", 0), ("n_batch", 1), ("parallel", 1),
                              ("max_queue", 0), ("max_body_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if isinstance(self.keep_alive, bool) or not isinstance(self.keep_alive, (int, float)) \
                or not 0 <= self.keep_alive < float("inf"):
            raise ValueError(f"keep_alive must be a number of seconds >= 0, got {self.keep_alive!r}")
        check_reasoning_format(self.reasoning_format)
        cache_type(self.type_k, self.type_v)
        if self.chat_template is not None:
            check_template(self.chat_template)
        resolve_budget(self.reasoning_budget, None)

    @property
    def alias(self) -> str:
        return self.model_alias or os.path.basename(self.model)


def add_arguments(p: argparse.ArgumentParser, *, ray: bool = False) -> None:
    """The options of ``sambay serve`` (and ``python -m sambay.server``); with ``ray``, also
    those of ``sambay serve --ray`` (:func:`add_ray_arguments`). Each option's environment
    variable (:data:`ENV_VARS`) is applied last."""
    p.add_argument("-m", "--model", required=True,
                   help="a phi4flash GGUF file, a cached model (phi4-flash:q4_k_m) or a Hugging "
                        "Face repo id pulled on first use (fixed for the server's lifetime)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("-c", "--n-ctx", "--ctx-size", dest="n_ctx", type=int, default=4096,
                   help="context length of each slot, i.e. each sequence (0: the model's trained context, "
                        "65536 for the real model)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per step")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="requests generated at once: sequences of one context, decoded together "
                        "(continuous batching)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a free slot; beyond that the server answers 503")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (default: no key)")
    p.add_argument("-a", "--alias", "--model-alias", dest="model_alias", default=None,
                   help="the model name clients see (default: the file name)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the largest max_tokens a request may ask for (default: the context length)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="the largest request body accepted")
    add_thread_arguments(p)
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=-1, help="layers on the GPU if any (-1: all)")
    p.add_argument("--cpu", action="store_true", help="compute on the CPU even if a GPU exists")
    p.add_argument("-s", "--seed", type=int, default=None,
                   help="seed of the samplers for requests that give none (slot i: SEED + i)")
    p.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="deepseek",
                   help="chat replies: the <think> trace in message.reasoning_content (deepseek) "
                        "or left inside content (none); a request's reasoning_format wins")
    p.add_argument("--reasoning-budget", type=int, default=None, metavar="N",
                   help="end the trace after N tokens by forcing </think> (default: unlimited); "
                        "a request's reasoning_budget or reasoning_effort wins")
    p.add_argument("--cors-origins", default="", metavar="ORIGINS",
                   help="comma-separated origins a browser may call the API from, '*' for any "
                        "(default: none; CORS preflights never need the API key)")
    p.add_argument("--sse-keep-alive", type=float, default=DEFAULT_KEEP_ALIVE_SECONDS, metavar="SECONDS",
                   help="while a stream has nothing to send (waiting for a slot, prefilling), a "
                        "': keep-alive' comment line every SECONDS so proxies keep the connection "
                        "(0: none)")
    p.add_argument("--metrics", action="store_true",
                   help="serve Prometheus metrics at GET /metrics (behind the API key if one is set)")
    add_engine_arguments(p)
    add_chat_template_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    if ray:
        add_ray_arguments(p)
    add_env_defaults(p)


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """``sambay serve --ray``'s options (replicas on a Ray cluster, see :mod:`sambay.ray_serve`)."""
    g = p.add_argument_group("Ray cluster (needs sambay[ray])")
    g.add_argument("--ray", action="store_true",
                   help="serve replicas of the engine on a Ray cluster behind one ingress at --host:--port")
    g.add_argument("--replicas", type=int, default=None, metavar="N", help="engine replicas (default: 1)")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="let Ray Serve add and remove replicas between MIN and MAX")
    g.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one is started)")


def check_ray_arguments(args: argparse.Namespace) -> None:
    """Raises ValueError for Ray options without ``--ray``, or both ``--replicas`` and ``--autoscale``."""
    given = [f"--{n}" for n in ("replicas", "autoscale", "address") if getattr(args, n) is not None]
    if given and not args.ray:
        raise ValueError(f"{', '.join(given)} only apply with --ray")
    if args.replicas is not None and args.autoscale is not None:
        raise ValueError("give --replicas or --autoscale, not both")


def from_args(args: argparse.Namespace) -> ServerSettings:
    """:class:`ServerSettings` from :func:`add_arguments`' options."""
    return ServerSettings(
        model=args.model, host=args.host, port=args.port, n_ctx=args.n_ctx, n_batch=args.batch_size,
        **thread_kwargs(args), n_gpu_layers=args.n_gpu_layers,
        device="cpu" if args.cpu else "auto", parallel=args.parallel, max_queue=args.max_queue,
        api_key=args.api_key or None, model_alias=args.model_alias, max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes, seed=args.seed, log_level=args.log_level,
        reasoning_format=args.reasoning_format, reasoning_budget=args.reasoning_budget,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        keep_alive=args.sse_keep_alive, metrics=args.metrics, chat_template=chat_template(args),
        **engine_kwargs(args),
    )



# --- SAMBAY_* environment variables (issue 14) ------------------------------------------------
# The one table of `serve` options and the environment variables that set them (llama-server's
# LLAMA_ARG_*): a variable gives the option's default, so the command line still wins; an empty
# variable counts as unset. A flag (--cpu, --metrics) takes 1/true/yes/on or 0/false/no/off.
ENV_VARS: dict[str, str] = {
    "--model": "SAMBAY_MODEL",
    "--host": "SAMBAY_HOST",
    "--port": "SAMBAY_PORT",
    "--ctx-size": "SAMBAY_CTX_SIZE",
    "--batch-size": "SAMBAY_BATCH_SIZE",
    "--parallel": "SAMBAY_PARALLEL",
    "--max-queue": "SAMBAY_MAX_QUEUE",
    "--api-key": "SAMBAY_API_KEY",
    "--alias": "SAMBAY_ALIAS",
    "--max-tokens": "SAMBAY_MAX_TOKENS",
    "--max-body-bytes": "SAMBAY_MAX_BODY_BYTES",
    "--threads": "SAMBAY_THREADS",
    "--threads-batch": "SAMBAY_THREADS_BATCH",
    "--n-gpu-layers": "SAMBAY_N_GPU_LAYERS",
    "--cpu": "SAMBAY_CPU",
    "--seed": "SAMBAY_SEED",
    "--reasoning-format": "SAMBAY_REASONING_FORMAT",
    "--reasoning-budget": "SAMBAY_REASONING_BUDGET",
    "--cors-origins": "SAMBAY_CORS_ORIGINS",
    "--sse-keep-alive": "SAMBAY_SSE_KEEP_ALIVE",
    "--metrics": "SAMBAY_METRICS",
    "--flash-attn": "SAMBAY_FLASH_ATTN",
    "--cache-type-k": "SAMBAY_CACHE_TYPE_K",
    "--cache-type-v": "SAMBAY_CACHE_TYPE_V",
    "--no-mmap": "SAMBAY_NO_MMAP",
    "--chat-template": "SAMBAY_CHAT_TEMPLATE",
    "--chat-template-file": "SAMBAY_CHAT_TEMPLATE_FILE",
    "--log-level": "SAMBAY_LOG_LEVEL",
    "--ray": "SAMBAY_RAY",
    "--replicas": "SAMBAY_RAY_REPLICAS",
    "--autoscale": "SAMBAY_RAY_AUTOSCALE",
    "--address": "SAMBAY_RAY_ADDRESS",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class _FromEnv(str):
    """An option's default taken from an environment variable (named in error messages)."""

    var: str


def _flag(text: str) -> bool:
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ValueError(f"{text!r} is not one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")
    return word in _TRUE


def _env_converter(action: argparse.Action) -> object:
    """``action``'s type, which also converts (and checks) a default from the environment:
    argparse converts a string default with the option's type when the option is not given."""
    is_flag = action.nargs == 0
    convert = _flag if is_flag else (action.type or str)

    def parse(text: str) -> object:
        if not isinstance(text, _FromEnv):
            return convert(text)  # type: ignore[operator]
        try:
            value = convert(str(text))  # type: ignore[operator]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"${text.var}={str(text)!r}: {err}") from None
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentTypeError(
                f"${text.var}={str(text)!r}: choose from {', '.join(map(str, action.choices))}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse's "invalid int value: ..."
    return parse


def env_var(action: argparse.Action) -> Optional[str]:
    """The environment variable of a ``serve`` option (None for --help)."""
    return next((ENV_VARS[o] for o in action.option_strings if o in ENV_VARS), None)


def add_env_defaults(p: argparse.ArgumentParser, environ: Optional[dict[str, str]] = None) -> None:
    """Names each option's variable in its help, and makes a set variable its default."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    for action in p._actions:
        var = env_var(action)
        if var is None:
            continue
        action.help = f"{action.help or ''} (env: {var})".lstrip()
        raw = env.get(var, "")
        if raw == "":
            continue
        default = _FromEnv(raw)
        default.var = var
        action.default = default
        action.type = _env_converter(action)  # type: ignore[assignment]
        action.required = False
