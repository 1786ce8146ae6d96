"""Request and response bodies of the HTTP server, as pydantic models shaped like OpenAI's.

Requests forbid unknown fields (a typo must not be silently ignored). Every sampling knob is
optional: a field left out takes :class:`sambay.Llama`'s default, so a request and the same call
through the Python API give the same text. Fields OpenAI defines that sambay cannot honour
(``n > 1``, image parts, ...) are rejected with a clear message rather
than ignored. ``response_format``, ``json_schema`` and ``grammar`` constrain the output
(:mod:`sambay.structured`). Responses are validated too, and dumped with ``exclude_unset`` so the JSON keeps
exactly the keys the engine produced.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..reasoning import check_reasoning_format, resolve_budget


log = logging.getLogger("sambay.server")
_logged: set[str] = set()


def log_ignored_once(names: Any, what: str = "field") -> None:
    """Say once per process that a request field (or a message key) is accepted and ignored."""
    for name in sorted(set(names) - _logged):
        _logged.add(name)
        log.info("request %s '%s' is accepted and ignored (it has no meaning for this server)", what, name)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------ shared fields

Stop = Union[str, list[str]]


def _check_stop(value: Optional[Stop]) -> Optional[Stop]:
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > 16:
        raise ValueError("at most 16 stop strings")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return value


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with empty ``choices`` and the usage."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(_Request):
    """The knobs completions and chat share (OpenAI's, then llama.cpp's extensions)."""

    model: Optional[str] = Field(None, description="accepted and ignored: the server has one model")
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Stop] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # llama.cpp / llama-cpp-python extensions
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, gt=0.0)
    # structured output (sambay.structured): OpenAI's response_format, llama.cpp's json_schema
    # and grammar (GBNF); an invalid schema or grammar is a 400 naming the problem
    response_format: Optional[dict[str, Any]] = None
    json_schema: Optional[Union[dict[str, Any], bool]] = None
    grammar: Optional[str] = None
    # llama.cpp's names for knobs that exist here
    n_probs: Optional[int] = Field(None, ge=0, le=20, description="llama.cpp's logprobs: top tokens per position")
    repeat_last_n: Optional[int] = Field(None, ge=-1, description="tokens the penalties look at (-1: all)")
    cache_prompt: Optional[bool] = Field(None, description="accepted: prefix reuse is always on")
    # accepted and ignored (logged once): OpenAI's and llama.cpp's fields without a meaning here
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    n_keep: Optional[int] = None
    id_slot: Optional[int] = None
    t_max_predict_ms: Optional[int] = None
    timings_per_token: Optional[bool] = None
    return_tokens: Optional[bool] = None
    post_sampling_probs: Optional[bool] = None
    samplers: Optional[list[str]] = None
    typical_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    mirostat: Optional[int] = Field(None, ge=0, le=2, description="0: off, 1: Mirostat, 2: Mirostat 2.0")
    mirostat_tau: Optional[float] = Field(None, ge=0.0)
    mirostat_eta: Optional[float] = Field(None, ge=0.0)
    # llama.cpp samplers sambay does not have: accepted at the value that turns them off
    tfs_z: Optional[float] = None
    dry_multiplier: Optional[float] = None
    xtc_probability: Optional[float] = None
    dynatemp_range: Optional[float] = None
    ignore_eos: Optional[bool] = None

    @model_validator(mode="after")
    def _samplers_off(self) -> "_Sampling":
        for name, off in NEUTRAL_FIELDS.items():
            value = getattr(self, name)
            if value is not None and value != off:
                raise ValueError(f"{name}={value!r} is not supported (only {off!r}, which turns it off)")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Optional[Stop]) -> Optional[Stop]:
        return _check_stop(v)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (v or {}).items():  # OpenAI's rules; the token ids are checked by the model
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    def sampling_kwargs(self) -> dict[str, Any]:
        """The fields that were given, as :class:`sambay.Llama` keyword arguments."""
        names = ("max_tokens", "temperature", "top_p", "stop", "presence_penalty",
                 "frequency_penalty", "seed", "top_k", "min_p", "repeat_penalty",
                 "response_format", "json_schema", "grammar", "logit_bias", "typical_p",
                 "mirostat_tau", "mirostat_eta")
        kw = self.model_dump(include=set(names), exclude_unset=True, exclude_none=True)
        if self.mirostat is not None:
            kw["mirostat_mode"] = self.mirostat
        if self.repeat_last_n is not None:
            kw["penalty_last_n"] = self.repeat_last_n if self.repeat_last_n >= 0 else 2**31 - 1
        log_ignored_once(name for name in (*IGNORED_FIELDS, *NEUTRAL_FIELDS, "cache_prompt")
                         if getattr(self, name, None) is not None)
        return kw


IGNORED_FIELDS = ("store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "n_keep",
                  "id_slot", "t_max_predict_ms", "timings_per_token", "return_tokens", "post_sampling_probs",
                  "samplers", "modalities", "verbosity", "parallel_tool_calls", "user")
# a llama.cpp sampler's field -> the value that turns it off (the only one accepted)
NEUTRAL_FIELDS: dict[str, Any] = {"tfs_z": 1.0, "dry_multiplier": 0.0,
                                  "xtc_probability": 0.0, "dynatemp_range": 0.0, "ignore_eos": False}


# ------------------------------------------------------------------------------ completions


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Union[str, list[int]] = Field(
        description="text or token ids; OpenAI's list form is accepted when it holds one prompt")
    suffix: Optional[str] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list with a single prompt is accepted)")
            return v[0]
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Optional[str]) -> Optional[str]:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model")
        return v

    def llama_kwargs(self) -> dict[str, Any]:
        kw = self.sampling_kwargs()
        if self.logprobs is not None or self.n_probs is not None:
            kw["logprobs"] = self.logprobs if self.logprobs is not None else self.n_probs
        if self.echo:
            kw["echo"] = True
        return kw


class CompletionLogprobs(_Response):
    tokens: list[str]
    text_offset: list[int]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]


class CompletionChoice(_Response):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(_Response):
    """A completion, or (``object`` the same, as OpenAI does) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


# ------------------------------------------------------------------------------ chat


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message; keys this server does not know (``annotations``, ``audio``, ``id``, ...) are
    dropped, never rendered (logged once)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            log_ignored_once(set(data) - set(cls.model_fields), "message key")
        return data

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None
    reasoning_content: Optional[str] = None  # a reply sent back as history: never rendered

    def to_template(self) -> dict[str, Any]:
        """The message as :meth:`sambay.Llama.create_chat_completion` takes it (the same
        function joins text parts, so the HTTP and Python paths render alike)."""
        return self.model_dump(exclude_none=True, exclude={"refusal", "reasoning_content"})


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    # the <think> trace: OpenAI's effort, llama-server's format, and a budget in tokens
    reasoning_effort: Optional[str] = None
    reasoning_format: Optional[str] = None
    reasoning_budget: Optional[int] = Field(None, ge=0)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    modalities: Optional[list[Literal["text"]]] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None

    @field_validator("reasoning_effort")
    @classmethod
    def _effort(cls, v: Optional[str]) -> Optional[str]:
        resolve_budget(None, v)
        return v

    @field_validator("reasoning_format")
    @classmethod
    def _format(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_reasoning_format(v)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if isinstance(v, dict):
            raise ValueError("forcing a tool is not supported; use 'auto' or 'none'")
        return v

    @model_validator(mode="after")
    def _one_max(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        return self

    def llama_kwargs(self) -> dict[str, Any]:
        kw = self.sampling_kwargs()
        if self.max_completion_tokens is not None:
            kw["max_tokens"] = self.max_completion_tokens
        if self.logprobs or self.n_probs:
            kw["logprobs"] = True
            kw["top_logprobs"] = self.top_logprobs if self.top_logprobs is not None else (self.n_probs or 0)
        if self.tools and self.tool_choice != "none":
            kw["tools"] = self.tools
        kw.update(self.model_dump(include={"reasoning_effort", "reasoning_format", "reasoning_budget",
                                           "chat_template_kwargs"}, exclude_none=True))
        return kw


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: Optional[list[TokenLogprob]]


class ChatResponseMessage(_Response):
    role: Literal["assistant"]
    content: Optional[str]
    reasoning_content: Optional[str] = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


# ------------------------------------------------------------------------------ the rest


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sambay"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    """``POST /tokenize`` (llama-server's shape)."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class TokenPiece(_Response):
    id: int
    piece: str


class TokenizeResponse(_Response):
    tokens: Union[list[int], list[TokenPiece]]


class DetokenizeRequest(_Request):
    """``POST /detokenize`` (llama-server's shape)."""

    tokens: list[int]


class DetokenizeResponse(_Response):
    content: str


class Health(_Response):
    status: Literal["ok"]
    slots_idle: int
    slots_processing: int
    queue: int
    queue_limit: int


class ErrorDetail(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Response):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
