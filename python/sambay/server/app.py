"""The FastAPI application: OpenAI's completions and chat endpoints, models, health, tokenize.

Routes only translate: a pydantic request becomes :class:`sambay.Llama` keyword arguments, the
work runs on a slot of a :class:`~sambay.server.backend.Backend` (this process's
:class:`~sambay.server.pool.SlotPool`, or replicas of it on a Ray cluster), and chunks go out as server-sent
events (``data: {json}`` ... ``data: [DONE]``). Errors leave in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``), with the status chosen by exception type
in one table (:data:`ERRORS`), never by message text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import asdict
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Sequence, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ChatTemplateError, ContextFullError, MissingDependencyError
from ..structured import GrammarError, compile_grammar
from .backend import Backend, ReplicaLost, conversation_key, conversation_start
from .metrics import MetricsMiddleware, ServerMetrics
from .pool import GenerationCancelled, QueueFull, ShuttingDown, SlotLlama, SlotPool
from .settings import DEFAULT_KEEP_ALIVE_SECONDS
from .sse import sse_events, start_stream
from .schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion,
                      CompletionRequest, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                      Health, ModelCard, ModelList, TokenizeRequest, TokenizeResponse)

log = logging.getLogger("sambay.server")

class InvalidParameter(ValueError):
    """A request parameter this server refuses (``param`` names it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# exception type -> (HTTP status, OpenAI error type, code); the first match along the MRO wins
ERRORS: dict[type, tuple[int, str, Optional[str]]] = {
    QueueFull: (503, "server_error", "server_busy"),
    ShuttingDown: (503, "server_error", "shutting_down"),
    ReplicaLost: (503, "server_error", "replica_lost"),
    ContextFullError: (400, "invalid_request_error", "context_length_exceeded"),
    ChatTemplateError: (400, "invalid_request_error", "invalid_messages"),
    GrammarError: (400, "invalid_request_error", "invalid_grammar"),
    MissingDependencyError: (501, "server_error", "not_implemented"),
    ValueError: (400, "invalid_request_error", None),
}


def classify(err: BaseException) -> tuple[int, str, Optional[str]]:
    """(status, type, code) of an exception from :data:`ERRORS` (500 when unknown)."""
    for cls in type(err).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return 500, "server_error", None


def error_body(message: str, type_: str, *, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return ErrorResponse.model_validate(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}).model_dump()


def error_response(status: int, message: str, type_: str = "invalid_request_error", *,
                   param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param=param, code=code), status_code=status,
                        headers=headers)


def exception_response(err: BaseException) -> JSONResponse:
    status, type_, code = classify(err)
    if status == 500:
        log.error("request failed", exc_info=err)
        return error_response(500, "internal server error", type_)
    headers = {"Retry-After": "1"} if status == 503 else None
    return error_response(status, str(err), type_, param=getattr(err, "param", None), code=code,
                          headers=headers)


# ---------------------------------------------------------------------------------------------
# pure ASGI middleware: they run before FastAPI reads anything


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: Optional[list] = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """401 for every request without ``Authorization: Bearer <key>`` (the scheme in any case,
    as RFC 7235 says), except the liveness probe ``GET /health``."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.OPEN_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            ok = hmac.compare_digest(token.strip(), self.expected)
            if not (scheme.lower() == b"bearer" and ok):
                await _send_json(send, 401, error_body(
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    "invalid_request_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes; the body is read (bounded) before the app
    sees it, then replayed, after which ``receive`` is the server's again (disconnects)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = error_body(f"request body over {self.limit} bytes", "invalid_request_error",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.limit:
                    await _send_json(send, 413, too_big)
                    return
            except ValueError:
                await _send_json(send, 400, error_body("invalid Content-Length", "invalid_request_error"))
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _send_json(send, 413, too_big)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replay: Optional[dict[str, Any]] = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def receive_replayed() -> Any:
            nonlocal replay
            if replay is not None:
                message, replay = replay, None
                return message
            return await receive()

        await self.app(scope, receive_replayed, send)


# ---------------------------------------------------------------------------------------------
# the application


async def parse_body(request: Request, schema: type[BaseModel]) -> Any:
    """The JSON body validated by ``schema``, whatever the Content-Type says (curl's ``-d``
    sends a form type); errors raise :class:`RequestValidationError` like FastAPI's own."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON"}])
    except RecursionError:  # the decoder recurses per nesting level
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": "invalid JSON: nested too deeply"}])
    if data is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "a JSON body is required"}])
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()])


def _usage(llm: SlotLlama) -> dict[str, int]:
    t = llm.last_timings
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens,
            "total_tokens": t.prompt_tokens + t.generated_tokens}


def _with_usage(chunks: Iterator[dict[str, Any]], llm: SlotLlama, include_usage: bool) -> Iterator[dict[str, Any]]:
    """The chunks, the one with the finish reason carrying the usage; with ``include_usage``
    the usage comes once, in OpenAI's extra last chunk with empty ``choices``, instead."""
    last: Optional[dict[str, Any]] = None
    for chunk in chunks:
        if not include_usage and chunk["choices"] and chunk["choices"][0].get("finish_reason") is not None:
            chunk["usage"] = _usage(llm)
        last = chunk
        yield chunk
    if include_usage and last is not None:
        yield {**{k: last[k] for k in ("id", "object", "created", "model")}, "choices": [], "usage": _usage(llm)}


def create_app(pool: Backend, *, model_alias: str, api_key: Optional[str] = None,
               max_tokens: Optional[int] = None, max_body_bytes: int = 4 * 2**20,
               reasoning_format: str = "deepseek", reasoning_budget: Optional[int] = None,
               cors_origins: Sequence[str] = (),
               keep_alive: Optional[float] = DEFAULT_KEEP_ALIVE_SECONDS,
               metrics: bool = False) -> FastAPI:
    """The OpenAI-compatible app over ``pool`` (which the app closes at shutdown).

    Args:
        pool: what generates: a :class:`SlotPool`, or another
            :class:`~sambay.server.backend.Backend` (Ray replicas).
        model_alias: the model name in ``/v1/models`` and in every response.
        api_key: require ``Authorization: Bearer <api_key>`` on every request.
        max_tokens: the largest ``max_tokens`` a request may ask for (default: ``n_ctx``).
        max_body_bytes: the largest request body accepted.
        reasoning_format: how chat replies carry the ``<think>`` trace when a request does not
            say (``"deepseek"``: in ``reasoning_content``; ``"none"``: inside ``content``).
        reasoning_budget: the trace budget in tokens for requests that give neither
            ``reasoning_budget`` nor ``reasoning_effort`` (None: unlimited).
        cors_origins: origins a browser may call from (``"*"``: any); CORS preflights are
            answered without the API key.
        keep_alive: seconds between SSE keep-alive comments on a stream that has nothing
            else to send (queued, prefilling, or a slow token); None or 0: none (the
            response then starts with the first token). See :mod:`.sse`.
        metrics: serve ``GET /metrics`` (Prometheus; behind the API key, as llama-server's);
            without it the endpoint answers 501, as llama-server's without ``--metrics``.

    Raises:
        MissingDependencyError: ``metrics`` without prometheus-client installed.
    """
    n_ctx = pool.llama.n_ctx()
    token_limit = min(max_tokens or n_ctx, n_ctx)
    created = int(time.time())
    tokenizer = pool.llama.tokenizer

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(title="sambay", description="OpenAI-compatible server for Phi-4-mini-flash-reasoning",
                  lifespan=lifespan)
    app.state.pool = pool
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if cors_origins:  # outermost: a preflight never reaches the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in cors_origins)
    # --- /metrics (issue 14): outermost, so refused requests (401, 413) are counted too
    if metrics and not isinstance(pool, SlotPool):
        raise ValueError("metrics=True needs the local slot pool (one process's counters)")
    server_metrics = ServerMetrics(pool) if metrics and isinstance(pool, SlotPool) else None
    if server_metrics is not None:
        app.add_middleware(MetricsMiddleware, metrics=server_metrics)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Any:
        """The server's counters in Prometheus' text format (see :mod:`.metrics`)."""
        if server_metrics is None:
            return error_response(501, "metrics are off: start the server with --metrics", "server_error",
                                  code="not_implemented")
        body, content_type = server_metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)
    # --- end /metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        parts, param, code = [], None, "invalid_value"
        for e in errs[:8]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            if e.get("type") == "extra_forbidden":
                parts.append(f"unrecognized request argument: {'.'.join(loc)}")
                code = "unknown_parameter"
            elif e.get("type") == "missing":
                parts.append(f"missing required argument: {'.'.join(loc)}" if loc else str(e.get("msg")))
                code = "missing_required_parameter"
            else:
                msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
                parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
            param = param or (loc[0] if loc else None)
        return error_response(422, "; ".join(parts), param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return exception_response(exc)

    @app.exception_handler(Exception)  # a bug: 500 in OpenAI's shape (uvicorn logs the traceback)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    def check_max_tokens(kw: dict[str, Any], *, default_to_limit: bool) -> None:
        n = kw.get("max_tokens")
        if n is not None and n > token_limit:
            raise InvalidParameter(f"max_tokens is {n}, above this server's limit of {token_limit}",
                                   "max_tokens")
        if n is None and default_to_limit and token_limit < n_ctx:
            kw["max_tokens"] = token_limit

    async def prompt_of(make: Callable[[], list[int]]) -> Optional[list[int]]:
        """The request's prompt tokens, to pick the slot holding most of them (None when there
        is no choice to make, or the prompt is bad: the work reports that)."""
        if pool.n_slots == 1:
            return None
        try:
            return await run_in_threadpool(make)
        except Exception:  # noqa: BLE001
            return None

    def check_constraint(kw: dict[str, Any]) -> None:
        """An invalid schema or grammar is refused before the request waits for a slot."""
        given = {k: kw[k] for k in ("response_format", "json_schema", "grammar") if k in kw}
        try:
            compile_grammar(**given)
        except GrammarError as err:
            err.param = next(iter(given), None)
            raise

    async def run(request: Request, work: Callable[[SlotLlama], Any], *, stream: bool,
                  schema: type[BaseModel], prompt_tokens: Optional[list[int]] = None,
                  conversation: Optional[str] = None) -> Any:
        """Acquire a slot, run ``work`` there, answer JSON or an event stream."""
        gone = asyncio.Event()
        job_box: list[Any] = []

        async def watch() -> None:  # receive() gives http.disconnect once the client is gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()
            for job in job_box:
                job.cancel()

        watcher = asyncio.create_task(watch())
        handed_over = False
        try:
            if not stream:
                try:
                    job = await pool.submit(work, stream=False, gone=gone, prompt_tokens=prompt_tokens,
                                            conversation=conversation)
                except GenerationCancelled:
                    return error_response(499, "client closed the request", code="client_closed")
                except (QueueFull, ShuttingDown) as err:
                    return exception_response(err)
                job_box.append(job)
                if gone.is_set():
                    job.cancel()
                try:
                    result = await job.result()
                except Exception as err:
                    return exception_response(err)
                if result is None:
                    return error_response(499, "client closed the request", code="client_closed")
                return result
            # --- SSE keep-alive (issue 14) -----------------------------------------------------
            # the wait for a slot and the prefill run as a task; an error that comes within the
            # first keep-alive interval still gets its HTTP status, a longer wait starts the
            # event stream with comment lines so that proxies keep the connection
            ready = asyncio.ensure_future(start_stream(pool, work, gone, prompt_tokens, job_box, conversation))
            await asyncio.wait({ready}, timeout=keep_alive or None)
            if ready.done():
                try:
                    ready.result()
                except GenerationCancelled:
                    return error_response(499, "client closed the request", code="client_closed")
                except Exception as err:
                    return exception_response(err)

            def encode(chunk: Any) -> str:
                return schema.model_validate(chunk).model_dump_json(exclude_unset=True)

            def encode_error(err: BaseException) -> str:
                status, type_, code = classify(err)
                if status == 500:
                    log.error("generation failed", exc_info=err)
                return json.dumps(error_body(str(err) if status != 500 else "internal server error",
                                             type_, code=code))

            def cleanup() -> None:
                watcher.cancel()
                gone.set()  # a request still waiting for its slot gives up
                for job in job_box:
                    job.cancel()  # harmless once the job is done

            handed_over = True
            return StreamingResponse(sse_events(ready, interval=keep_alive, encode=encode,
                                                encode_error=encode_error, cleanup=cleanup),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            # --- end SSE keep-alive ------------------------------------------------------------
        finally:
            if not handed_over:
                watcher.cancel()

    @app.post("/v1/completions", response_model=Completion, response_model_exclude_unset=True,
              responses={400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def completions(request: Request) -> Any:
        """OpenAI's (legacy) text completion, streaming with ``stream: true``."""
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        kw = body.llama_kwargs()
        check_max_tokens(kw, default_to_limit=False)
        check_constraint(kw)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        prompt = body.prompt

        def work(llm: SlotLlama) -> Any:
            if body.stream:
                chunks = cast(Iterator[dict[str, Any]],  # stream=True: the chunks' iterator
                              llm.create_completion(prompt, stream=True, model=model_alias, **kw))
                return _with_usage(chunks, llm, include_usage)
            return llm.create_completion(prompt, model=model_alias, **kw)

        tokens = await prompt_of(lambda: pool.llama.tokenize(prompt) if isinstance(prompt, str)
                                 else list(prompt))
        key = conversation_key(request.headers, body.user, prompt[:256])
        return await run(request, work, stream=body.stream, schema=Completion, prompt_tokens=tokens,
                         conversation=key)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_unset=True,
              responses={400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def chat_completions(request: Request) -> Any:
        """OpenAI's chat completion, streaming with ``stream: true``."""
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        kw = body.llama_kwargs()
        kw.setdefault("reasoning_format", reasoning_format)
        if reasoning_budget is not None and "reasoning_budget" not in kw and "reasoning_effort" not in kw:
            kw["reasoning_budget"] = reasoning_budget
        check_max_tokens(kw, default_to_limit=True)
        check_constraint(kw)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        messages = [m.to_template() for m in body.messages]

        def work(llm: SlotLlama) -> Any:
            if body.stream:
                chunks = cast(Iterator[dict[str, Any]],  # stream=True: the chunks' iterator
                              llm.create_chat_completion(messages, stream=True, model=model_alias, **kw))
                return _with_usage(chunks, llm, include_usage)
            return llm.create_chat_completion(messages, model=model_alias, **kw)

        tokens = await prompt_of(lambda: pool.llama.chat_prompt(messages)[1])
        key = conversation_key(request.headers, body.user, conversation_start(messages))
        return await run(request, work, stream=body.stream, schema=ChatCompletionChunk, prompt_tokens=tokens,
                         conversation=key)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Any:
        """The one model this server runs."""
        return ModelList(data=[ModelCard(id=model_alias, created=created)])

    @app.get("/health", response_model=Health)
    async def health() -> Any:
        """Liveness plus the slot and queue counts."""
        return Health(status="ok", slots_idle=pool.n_slots - pool.n_busy, slots_processing=pool.n_busy,
                      queue=pool.n_waiting, queue_limit=pool.max_queue)

    @app.get("/props")
    async def props() -> Any:
        """llama-server's ``/props``: the context, the chat template, the model, and the
        default sampling settings (the model file's recommended ones over the library's)."""
        llm = pool.llama
        return {"default_generation_settings": {"n_ctx": n_ctx, "model": model_alias,
                                                "params": {**asdict(llm.sampling_defaults),
                                                           "n_predict": token_limit}},
                "total_slots": pool.n_slots, "model_path": model_alias, "model_alias": model_alias,
                "n_ctx": n_ctx, "chat_template": llm.chat_template or "",
                "modalities": {"vision": False, "audio": False}}

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: Request) -> Any:
        """Token ids of ``content`` (llama-server's shape)."""
        body: TokenizeRequest = await parse_body(request, TokenizeRequest)
        ids = await run_in_threadpool(tokenizer.encode, body.content, add_bos=body.add_special,
                                      special=body.parse_special)
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": i, "piece": tokenizer.token_bytes(i, special=True).decode("utf-8", "replace")}
                           for i in ids]}

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request) -> Any:
        """The text of ``tokens`` (llama-server's shape)."""
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        n_vocab = pool.llama.n_vocab()
        for i, t in enumerate(body.tokens):
            if not 0 <= t < n_vocab:
                return error_response(400, f"invalid token id {t} at index {i} (n_vocab is {n_vocab})",
                                      param="tokens")
        text = await run_in_threadpool(tokenizer.decode, body.tokens)
        return {"content": text.decode("utf-8", "replace")}

    return app


def make_server(app: FastAPI, **config: Any) -> Any:
    """A ``uvicorn.Server`` for ``app`` whose exit signal (Ctrl-C, SIGTERM) first stops the
    generations (:meth:`SlotPool.shutdown`), so shutting down does not wait for long streams.

    Args:
        app: from :func:`create_app`.
        **config: ``uvicorn.Config`` keywords (host, port, log_level, ...).
    """
    import uvicorn

    pool: Backend = app.state.pool

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            pool.shutdown()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, **config))
