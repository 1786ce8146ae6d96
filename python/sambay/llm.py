"""``sambay.LLM``: many prompts in, one result per prompt out, all decoded together.

The shape of vLLM's offline API (``LLM(model).generate(prompts, sampling_params)``) over a
:class:`sambay.Llama` with ``n_seq_max`` sequences: each prompt runs on a sequence of one
engine context, and the sequences' decode steps run as one batch (the weights are read once per
step for all of them; see :mod:`sambay.batch`). Every prompt has its own parameters and seed; the
results are those each prompt gives alone.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence, TypeGuard, Union, cast

from .llama import Llama

__all__ = ["LLM", "GenerationParams", "RequestOutput", "CompletionOutput"]

Prompt = Union[str, Sequence[int]]
Conversation = Sequence[dict[str, Any]]


def _is_token_ids(prompts: object) -> TypeGuard[Sequence[int]]:
    return (isinstance(prompts, Sequence) and not isinstance(prompts, str) and len(prompts) > 0
            and all(isinstance(t, int) for t in prompts))


def _prompt_list(prompts: Union[Prompt, Sequence[Prompt]]) -> list[Prompt]:
    """The prompts as a list: one text, or one list of token ids, is a single prompt."""
    if isinstance(prompts, str) or _is_token_ids(prompts):
        return [prompts]
    return list(cast(Sequence[Prompt], prompts))


@dataclass(frozen=True)
class GenerationParams:
    """What to generate for one prompt (vLLM's ``SamplingParams`` fields that sambay has).

    Sampling fields left ``None`` take the model file's recommended values
    (:attr:`sambay.Llama.sampling_defaults`).
    """

    max_tokens: Optional[int] = 16
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repeat_penalty: Optional[float] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    seed: Optional[int] = None

    @classmethod
    def of(cls, value: Union["GenerationParams", dict[str, Any], None]) -> "GenerationParams":
        """``value`` as parameters: an instance, a dict of its fields (vLLM's
        ``repetition_penalty`` is accepted for ``repeat_penalty``), or None for the defaults."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            d = dict(value)
            if "repetition_penalty" in d:
                d["repeat_penalty"] = d.pop("repetition_penalty")
            unknown = set(d) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
            return cls(**d)
        raise TypeError(f"parameters must be GenerationParams, a dict or None, got {type(value).__name__}")


@dataclass
class CompletionOutput:
    index: int
    text: str
    finish_reason: Optional[str]
    reasoning_content: Optional[str] = None  # chat: the model's thinking, apart from ``text``


@dataclass
class RequestOutput:
    """One prompt's result (vLLM's shape: ``outputs[0].text``)."""

    index: int
    prompt: Union[str, Sequence[int], Conversation]
    outputs: list[CompletionOutput]
    usage: dict[str, int] = field(default_factory=dict)
    finished: bool = True


class LLM:
    """A model with ``n_seq_max`` sequences, decoding lists of prompts together.

    Args:
        model_path: a phi4flash GGUF (or an already constructed :class:`sambay.Llama` with
            ``n_seq_max > 1`` via ``llama=``).
        n_seq_max: sequences decoded at once (more prompts wait for a free one).
        **llama_kwargs: the :class:`sambay.Llama` keywords (``n_ctx`` is per sequence).
    """

    def __init__(self, model_path: Optional[Union[str, os.PathLike]] = None, *, n_seq_max: int = 8,
                 llama: Optional[Llama] = None, **llama_kwargs: Any) -> None:
        if llama is None:
            if model_path is None:
                raise ValueError("give model_path or llama")
            llama = Llama(model_path, n_seq_max=n_seq_max, **llama_kwargs)
        if llama.n_seq_max < 2:
            raise ValueError("LLM needs a Llama with n_seq_max >= 2")
        self.llama = llama
        self._free: "queue.Queue[Llama]" = queue.Queue()
        for s in range(llama.n_seq_max):
            self._free.put(llama.sequence(s))
        self._lock = threading.Lock()  # one generate/chat call at a time

    @property
    def n_seq_max(self) -> int:
        return self.llama.n_seq_max

    # ------------------------------------------------------------------ plumbing

    def _params(self, params: Any, n: int) -> list[GenerationParams]:
        if isinstance(params, (list, tuple)):
            if len(params) != n:
                raise ValueError(f"{len(params)} parameter sets for {n} prompts")
            return [GenerationParams.of(p) for p in params]
        one = GenerationParams.of(params)
        return [one] * n

    def _run(self, jobs: list[Any]) -> Iterator[tuple[int, Any]]:
        """Runs ``job(seq_llama)`` for every job, as many at once as there are sequences;
        yields (index, item) for every item the jobs produce (each job is a generator)."""
        out: "queue.Queue[tuple[int, Any]]" = queue.Queue()
        done = object()
        stop = threading.Event()

        def run(i: int, job: Any) -> None:
            if stop.is_set():  # the caller left before this prompt started
                out.put((i, done))
                return
            llm = self._free.get()
            try:
                for item in job(llm):
                    if stop.is_set():
                        llm.cancel()
                        break
                    out.put((i, item))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                out.put((i, err))
            finally:
                self._free.put(llm)
                out.put((i, done))

        with self._lock, ThreadPoolExecutor(max_workers=self.n_seq_max, thread_name_prefix="sambay-seq") as ex:
            for i, job in enumerate(jobs):
                ex.submit(run, i, job)
            left = len(jobs)
            try:
                while left:
                    i, item = out.get()
                    if item is done:
                        left -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield i, item
            finally:
                stop.set()

    # ------------------------------------------------------------------ completions

    def _completion_job(self, prompt: Prompt, p: GenerationParams, stream: bool) -> Any:
        kw = asdict(p)

        def job(llm: Llama) -> Iterator[Any]:
            if stream:
                yield from llm.create_completion(prompt, stream=True, **kw)
            else:
                yield llm.create_completion(prompt, **kw)
        return job

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[GenerationParams, dict[str, Any], Sequence[Any], None] = None
                 ) -> list[RequestOutput]:
        """Completes every prompt (text or token ids); one :class:`RequestOutput` per prompt,
        in order. ``sampling_params``: one set for all, or a list with one per prompt."""
        prompt_list = _prompt_list(prompts)
        params = self._params(sampling_params, len(prompt_list))
        results: list[Optional[RequestOutput]] = [None] * len(prompt_list)
        jobs = [self._completion_job(pr, pa, False) for pr, pa in zip(prompt_list, params)]
        for i, res in self._run(jobs):
            ch = res["choices"][0]
            results[i] = RequestOutput(i, prompt_list[i], [CompletionOutput(0, ch["text"], ch["finish_reason"])],
                                       usage=dict(res.get("usage") or {}))
        return [r for r in results if r is not None]

    def generate_stream(self, prompts: Union[Prompt, Sequence[Prompt]],
                        sampling_params: Union[GenerationParams, dict[str, Any], Sequence[Any], None] = None
                        ) -> Iterator[tuple[int, str, Optional[str]]]:
        """Yields ``(prompt index, text piece, finish_reason)`` as the prompts are decoded
        together; each prompt's last piece carries its finish reason."""
        prompt_list = _prompt_list(prompts)
        params = self._params(sampling_params, len(prompt_list))
        jobs = [self._completion_job(pr, pa, True) for pr, pa in zip(prompt_list, params)]
        for i, chunk in self._run(jobs):
            ch = chunk["choices"][0]
            yield i, ch["text"], ch["finish_reason"]

    # ------------------------------------------------------------------ chat

    def chat(self, conversations: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[GenerationParams, dict[str, Any], Sequence[Any], None] = None,
             **chat_kwargs: Any) -> list[RequestOutput]:
        """Answers every conversation (a list of messages each); the reasoning trace is kept
        apart in ``outputs[0].reasoning_content``. ``chat_kwargs`` go to
        :meth:`sambay.Llama.create_chat_completion` (``reasoning_format``, ``reasoning_budget``...)."""
        if conversations and isinstance(conversations[0], dict):
            convs = [cast(Conversation, conversations)]  # one conversation
        else:
            convs = list(cast(Sequence[Conversation], conversations))
        params = self._params(sampling_params, len(convs))
        results: list[Optional[RequestOutput]] = [None] * len(convs)

        def job_for(conv: Conversation, p: GenerationParams) -> Any:
            def job(llm: Llama) -> Iterator[Any]:
                yield llm.create_chat_completion(list(conv), **asdict(p), **chat_kwargs)
            return job

        for i, res in self._run([job_for(c, p) for c, p in zip(convs, params)]):
            ch = res["choices"][0]
            msg = ch["message"]
            results[i] = RequestOutput(i, convs[i], [CompletionOutput(0, msg.get("content") or "", ch["finish_reason"],
                                                                      msg.get("reasoning_content"))],
                                       usage=dict(res.get("usage") or {}))
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.llama.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
