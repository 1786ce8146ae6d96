"""``sambay.Llama``: the llama-cpp-python-shaped API over the C++ engine.

``generate`` (a generator of token ids) is the one primitive: completions and chat build their
chunks from it, and the non-streaming calls drain the same stream, so the two cannot drift.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np

from . import _compat
from ._native import _core
from ._stream import StopStringFilter
from .chat import ChatFormatter, check_template, choose_template
from .batch import SharedContext
from .engine import AbortedError, Context, LoadError, Model
from .gguf_metadata import check_model_file
from .reasoning import (FORCED_CLOSE, THINK_OPEN, ReasoningBudget, ReasoningSplitter,
                        check_reasoning_format, prompt_opens_trace, resolve_budget)
from .sampling import (LogitsProcessor, MirostatState, SamplingParams, StoppingCriteria, adjust_logits,
                       check_logit_bias, log_softmax, make_rng, sample)
from .structured import GrammarConstraint, compile_grammar
from .tokenizer import StreamDecoder, Tokenizer

Prompt = Union[str, bytes, Sequence[int]]
_LlamaT = TypeVar("_LlamaT", bound="Llama")  # sequence() of a subclass is that subclass
_log = logging.getLogger("sambay")
_NO_ROWS = np.zeros((0, 0), dtype=np.float32)  # Llama._all_logits before any eval
_NO_ROWS.flags.writeable = False


@dataclass(frozen=True)
class LlamaState:
    """A snapshot of a :class:`Llama`: the evaluated tokens, the last logits and every cache."""

    input_ids: tuple[int, ...]
    last_logits: Optional[np.ndarray]
    engine_state: bytes

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class Timings:
    """Counts and seconds of the last completion (for the CLI's speed report)."""

    prompt_tokens: int = 0
    prompt_evaluated: int = 0  # tokens actually run through the engine (after prefix reuse)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _stop_strings(stop: Any) -> list[str]:
    """``stop`` as a list: None, one string, or a sequence of strings (as the OpenAI API)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, Sequence) and not isinstance(stop, (bytes, bytearray)) and all(
            isinstance(s, str) for s in stop):
        return list(stop)
    raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")


_GUARD = threading.Lock()  # makes "is it generating? then it is" one step


class _Closed:
    """Stands for the context and model of a closed Llama: any use says so."""

    def __getattr__(self, name: str) -> Any:
        raise ValueError("this Llama is closed")


_CLOSED: Any = _Closed()


class Llama:
    """A loaded model plus one evaluation context, with llama-cpp-python's API.

    Args:
        model_path: a GGUF file from ``sambay convert`` (optionally ``sambay quantize``).
        n_ctx: context length in tokens; 0 means the model's trained context (65536 for
            Phi-4-mini-flash-reasoning: see the README for what long contexts cost).
        n_batch: prompt tokens per engine step (micro-batch).
        n_threads: threads for single-token decoding. ``None`` (default): the engine chooses,
            and adapts the count by timing its steps (one thread when other programs keep the
            cores busy, all usable cores when they are free); 0: all cores; N: exactly N.
        n_threads_batch: threads for prompt processing (and steps of several sequences); the
            same choices, chosen separately.
        n_gpu_layers: layers to put on a GPU when the installed ggml has one (-1: all, 0: none).
        seed: seed of the sampler's generator (None, or llama-cpp-python's -1: fresh entropy);
            a call's ``seed`` wins.
        logits_all: keep the logits of every prompt position (needed for prompt logprobs
            with ``echo``); otherwise only the last position's logits are computed, and the
            cross-decoder runs on one row during prefill.
        chat_template: the chat template to use instead of the GGUF's
            (``tokenizer.chat_template``): a name of :data:`sambay.chat.BUILTIN_TEMPLATES`
            (llama.cpp's ``chatml``, ``phi3``, ``phi4``) or Jinja text (llama.cpp's
            ``--chat-template``); checked when the model loads.
        chat_format: llama-cpp-python's name for the same choice: a name of
            :data:`sambay.chat.BUILTIN_TEMPLATES`; another name raises ValueError.
        kv_type: ``"f16"`` (default), ``"bf16"`` or ``"f32"`` for the attention caches.
        device: ``"auto"`` (a GPU when present), ``"cpu"``, or a ggml device name.
        max_snapshots: how many prompt-end state snapshots to keep for prefix reuse.
        n_seq_max: sequences the context holds (each of ``n_ctx`` positions). With more than
            one, :meth:`sequence` gives a Llama for each, to use from its own thread: their
            evaluations run together, one engine step for all of them (continuous batching;
            :class:`sambay.LLM` does this for a list of prompts).
        verbose: log load details to the ``sambay`` logger.
        model: an already-loaded :class:`sambay.engine.Model` of ``model_path`` to share
            (its weights are not loaded again; ``device``, ``n_gpu_layers`` and ``use_mmap``
            are then the model's). See :meth:`from_model`.
        n_ubatch, flash_attn, type_k, type_v: llama-cpp-python's: ``n_ubatch`` bounds
            ``n_batch`` (the micro-batch here), ``flash_attn`` uses ggml's fused attention,
            ``type_k``/``type_v`` (ggml type ids or names; the same for both) set ``kv_type``.
        **llama_cpp_kwargs: llama-cpp-python's other keywords (``use_mlock``, ``rope_freq_base``,
            ``offload_kqv``, ...: :data:`sambay._compat.IGNORED_KEYWORDS`) are accepted with one
            warning each, as they change nothing here; any other keyword is a TypeError.

    Attributes:
        sampling_defaults: the :class:`~sambay.sampling.SamplingParams` a call's sampling
            arguments default to: the file's recommended settings (``general.sampling.*``,
            e.g. temperature 0.6 and top_p 0.95 for Phi-4-mini-flash-reasoning) over the
            library's defaults. An explicit argument always wins.
        eval_progress: None, or a callable ``(done, total)`` that every evaluation calls
            before its first micro-batch (``done`` 0) and after each one, ``total`` being the
            tokens of that evaluation (a prompt's unevaluated part, or 1 for a decode step);
            ``sambay chat`` draws its prefill progress with it. It runs in the evaluating
            thread, between two of the engine's micro-batches, and an exception it raises ends
            the evaluation there: the tokens evaluated before stay (``input_ids``,
            ``n_tokens_evaluated`` and the logits say so), as after a Ctrl-C.

    Raises:
        sambay.LoadError: the file is missing, not a GGUF, or not a valid phi4flash model.
        ValueError: invalid arguments.
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        n_gpu_layers: int = -1,
        seed: Optional[int] = None,
        logits_all: bool = False,
        chat_format: Optional[str] = None,
        chat_template: Optional[str] = None,
        kv_type: str = "f16",
        device: str = "auto",
        use_mmap: bool = True,
        max_snapshots: int = 4,
        n_seq_max: int = 1,
        verbose: bool = True,
        model: Optional[Model] = None,
        n_ubatch: Optional[int] = None,
        flash_attn: bool = False,
        type_k: Any = None,
        type_v: Any = None,
        **llama_cpp_kwargs: Any,
    ) -> None:
        # llama-cpp-python's keywords (sambay._compat): mapped, or a warning once
        n_batch, kv_type, seed = _compat.resolve(llama_cpp_kwargs, n_batch=n_batch, n_ubatch=n_ubatch,
                                                 kv_type=kv_type, type_k=type_k, type_v=type_v, seed=seed)
        chat_template = _compat.chat_format_template(chat_format, chat_template)
        if chat_template is not None:  # a bad name or template fails before the weights load
            check_template(chat_template)
        _check_int("n_ctx", n_ctx, 0)
        _check_int("n_batch", n_batch, 1)
        # None: the engine adapts the count, 0: all cores (both resolved by engine.Context)
        for name, n in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
            if n is not None:
                _check_int(name, n, 0)
        _check_int("max_snapshots", max_snapshots, 0)
        _check_int("n_seq_max", n_seq_max, 1)
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
            raise ValueError(f"n_gpu_layers must be an integer, got {n_gpu_layers!r}")
        path = os.fspath(model_path)
        if model is not None:
            if not isinstance(model, Model):
                raise TypeError(f"model must be a sambay.engine.Model, got {type(model).__name__}")
            if os.path.abspath(path) != os.path.abspath(model.path):
                raise ValueError(f"model_path {path!r} is not the path of the given model ({model.path!r})")
        else:
            check_model_file(path, LoadError)

        self.model_path = path
        self.verbose = verbose
        self.chat_format = chat_format
        self._model = model if model is not None else Model(
            path, device=device, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
        ctx = Context(
            self._model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
            n_threads_batch=n_threads_batch, logits_all=logits_all, kv_type=kv_type, flash_attn=flash_attn,
            n_seq_max=n_seq_max,
        )
        # several sequences: every one (this Llama's own is sequence 0) goes through the
        # scheduler that batches their evaluations
        self._shared: Optional[SharedContext] = SharedContext(ctx) if n_seq_max > 1 else None
        self._ctx: Any = self._shared.sequence(0) if self._shared is not None else ctx
        self.metadata: dict[str, Any] = dict(self._model.metadata())
        # the file's recommended settings (general.sampling.*) over the library's defaults
        try:
            self.sampling_defaults = SamplingParams.from_metadata(self.metadata)
        except ValueError as err:
            raise LoadError(f"{path}: {err}") from None
        self._tokenizer: Optional[Tokenizer] = None
        self._chat: Optional[ChatFormatter] = None
        self._chat_source = choose_template(chat_template, self.metadata.get("tokenizer.chat_template"))
        self._rng = make_rng(seed)
        self.logits_all = logits_all
        self.max_snapshots = max_snapshots
        self._input_ids: list[int] = []
        self._last_logits: Optional[np.ndarray] = None  # logits after the last evaluated token
        self._all_logits: np.ndarray = _NO_ROWS  # with logits_all: one row per token of the last eval
        self._snapshots: list[LlamaState] = []
        self.last_timings = Timings()
        self.n_tokens_evaluated = 0  # total tokens run through the engine (prefix-reuse tests)
        self.eval_progress: Optional[Callable[[int, int], None]] = None
        # one generation and one evaluation at a time: a second one raises (never corrupts)
        self._generating = False
        self._evaluating = threading.Lock()
        if verbose:
            mem = self.memory_breakdown()
            _log.info("loaded %s: n_vocab %d, n_embd %d, device %s; context n_ctx %d, n_batch %d, kv %s, "
                      "flash_attn %s, %.1f MiB", path, self.n_vocab(), self.n_embd(), self.device,
                      self.n_ctx(), self._ctx.n_batch, kv_type, self._ctx.flash_attn,
                      sum(mem.values()) / 2**20)

    @classmethod
    def from_model(cls, model: Model, **kwargs: Any) -> "Llama":
        """A new context over an already-loaded model: several Llama objects made this way
        share one copy of the weights, each with its own caches, and may run in different
        threads at once (the engine releases the GIL while it computes).

        Args:
            model: a :class:`sambay.engine.Model`.
            **kwargs: the constructor's keywords (``n_ctx``, ``n_threads``, ``seed``, ...).
        """
        return cls(model.path, model=model, **kwargs)

    @property
    def n_seq_max(self) -> int:
        """Sequences of this Llama's context (see :meth:`sequence`)."""
        return self._shared.n_seq_max if self._shared is not None else 1

    def sequence(self: _LlamaT, seq: int, *, seed: Optional[int] = None) -> _LlamaT:
        """A Llama on sequence ``seq`` of this one's context (``0 .. n_seq_max-1``; 0 is this
        Llama's own). It shares the model, tokenizer and settings and has its own tokens,
        snapshots and random generator (seeded with ``seed``). Use each sequence from one thread at a time; the
        evaluations of sequences used from different threads at once run as one engine step.

        Raises:
            ValueError: ``seq`` out of range, or this Llama has one sequence (``n_seq_max=1``).
        """
        if self._shared is None:
            raise ValueError("this Llama has one sequence: create it with n_seq_max > 1")
        view = copy.copy(self)
        view._ctx = self._shared.sequence(seq)
        view._rng = make_rng(seed)
        view._input_ids = []
        view._last_logits = None
        view._all_logits = _NO_ROWS
        view._snapshots = []
        view.last_timings = Timings()
        view.n_tokens_evaluated = 0
        view.eval_progress = None
        view._generating = False
        view._evaluating = threading.Lock()
        return view

    @classmethod
    def from_pretrained(cls, repo_id: str, *, quant: str = "Q4_K_M", filename: Optional[str] = None,
                        revision: Optional[str] = None, progress: bool = True,
                        **kwargs: Any) -> "Llama":
        """Load a model from the Hugging Face Hub through sambay's model cache: pulled
        (downloaded, converted, quantized; see ``sambay pull``) the first time, from the
        cache afterwards. Needs ``pip install "sambay[hub]"``.

        Args:
            repo_id: a checkpoint repository (``microsoft/Phi-4-mini-flash-reasoning``) or a
                repository of phi4flash GGUF files.
            quant: the type to quantize to (a GGUF repository: the file named after it).
            filename: a GGUF repository's file name or pattern (``*Q4_K_M.gguf``).
            revision: branch, tag or commit.
            progress: download and conversion progress bars on stderr.
            **kwargs: the constructor's keywords (``n_ctx``, ``n_threads``, ``seed``, ...).

        Raises:
            PullError: the pull failed (no such repository or revision, no weights, no disk
                space).
            MissingDependencyError: huggingface_hub is not installed.
        """
        from .hub import ensure

        entry = ensure(repo_id, quant=quant, file=filename, revision=revision, progress=progress)
        return cls(entry.path, **kwargs)

    @property
    def model(self) -> Model:
        """The loaded :class:`sambay.engine.Model` (shareable with :meth:`from_model`)."""
        return self._model

    # ------------------------------------------------------------------ properties

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, rebuilt from the GGUF on first use."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_metadata(self.metadata)
        return self._tokenizer

    def n_ctx(self) -> int:
        """Context length in tokens."""
        return int(self._ctx.n_ctx)

    def n_vocab(self) -> int:
        """Rows of the output layer (the vocabulary size)."""
        return int(self._model.n_vocab)

    def n_embd(self) -> int:
        """Width of the model's hidden state."""
        return int(self._model.n_embd)

    def token_eos(self) -> Optional[int]:
        return self.tokenizer.eos_id

    def token_nl(self) -> int:
        """The id of the newline token."""
        return self.tokenize("\n")[-1]

    def set_seed(self, seed: int) -> None:
        """Reseed the sampler's generator (llama-cpp-python's; -1: fresh entropy)."""
        self._rng = make_rng(None if seed in _compat.RANDOM_SEEDS else seed)

    @property
    def n_tokens(self) -> int:
        """How many tokens the context has evaluated."""
        return len(self._input_ids)

    @property
    def scores(self) -> np.ndarray:
        """Logits, float32 ``[rows, n_vocab]``: with ``logits_all``, one row per token of the
        last :meth:`eval` call (a prompt's positions; a generation step evaluates one token),
        else the row after the last evaluated token (empty before any)."""
        if self.logits_all and len(self._all_logits):
            return self._all_logits.copy()
        if self._last_logits is None:
            return np.zeros((0, self.n_vocab()), dtype=np.float32)
        return self._last_logits[None, :].copy()

    @property
    def eval_logits(self) -> list[list[float]]:
        """:attr:`scores` as lists (llama-cpp-python's ``eval_logits``)."""
        return self.scores.tolist()

    def token_bos(self) -> Optional[int]:
        return self.tokenizer.bos_id

    @property
    def input_ids(self) -> list[int]:
        """The tokens the context has evaluated, in order."""
        return list(self._input_ids)

    @property
    def device(self) -> str:
        """The device the model computes on (e.g. ``"CPU"``)."""
        return str(self._ctx.device)

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes per part of the context's memory (Mamba states, SWA rings, shared KV, ...)."""
        return dict(self._ctx.memory_breakdown())

    @property
    def threads(self) -> dict[str, dict[str, Any]]:
        """The engine's thread count choice for single-token steps (``"decode"``) and longer ones
        (``"batch"``): ``adaptive``, ``current``, ``n_max``, ``probes``, ``switches``
        (:attr:`sambay.engine.Context.threads`)."""
        return dict(self._ctx.threads)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: Union[str, bytes], add_bos: Optional[bool] = None,
                 special: bool = False) -> list[int]:
        """Token ids of ``text`` (``special``: parse special tokens like ``<|end|>``)."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """The bytes of ``tokens`` (``prev_tokens`` is accepted for llama-cpp-python
        compatibility: byte-level BPE pieces do not depend on context)."""
        return self.tokenizer.decode(tokens, special=special)

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        n_vocab = self.n_vocab()
        out = []
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"token at index {i} is not an integer: {t!r}")
            if not 0 <= int(t) < n_vocab:
                raise ValueError(f"invalid token id {int(t)} at index {i} (n_vocab is {n_vocab})")
            out.append(int(t))
        return out

    # ------------------------------------------------------------------ evaluation

    def reset(self) -> None:
        """Forget the evaluated tokens (the caches start fresh; snapshots are kept)."""
        self._ctx.reset()
        self._input_ids = []
        self._last_logits = None
        self._all_logits = _NO_ROWS

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after those already evaluated, in one engine call (the engine
        cuts it into micro-batches of ``n_batch``).

        Raises:
            ValueError: an invalid token id.
            ContextFullError: more tokens than the context has room for (also a ValueError);
                nothing is evaluated.
            AbortedError: :meth:`cancel` stopped it (see there).
            KeyboardInterrupt, or what ``eval_progress`` raised: between two micro-batches;
                the tokens evaluated before stay evaluated.
        """
        tokens = self._check_tokens(tokens)
        if not tokens:
            return
        if not self._evaluating.acquire(blocking=False):
            raise RuntimeError("this Llama is evaluating in another thread: use one Llama per thread "
                               "(Llama(n_seq_max=N).sequence(i) shares one context among threads)")
        try:
            self._eval(tokens)
        finally:
            self._evaluating.release()

    def _eval(self, tokens: list[int]) -> None:
        self._ctx.check_fits(len(self._input_ids) + len(tokens))
        # one engine call; the engine cuts it into micro-batches and calls on_ubatch after each,
        # where the evaluated tokens are recorded: a KeyboardInterrupt (Ctrl-C), an exception
        # from eval_progress or a cancel() stops it between two of them with input_ids,
        # n_tokens_evaluated and the logits matching what the engine holds
        progress = self.eval_progress
        n_fed = 0

        def on_ubatch(done: int, total: int, logits: np.ndarray) -> None:
            nonlocal n_fed
            self._input_ids.extend(tokens[n_fed:done])
            self.n_tokens_evaluated += done - n_fed
            n_fed = done
            self._last_logits = logits[-1]
            if self.logits_all:  # the rows of this call only: all rows of a long run would be GBs
                self._all_logits = logits
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, len(tokens))
        try:
            self._ctx.eval(np.asarray(tokens, dtype=np.int64), on_ubatch=on_ubatch)
        except AbortedError:
            if self._ctx.needs_reset:
                # cancelled inside a graph: the caches are half-written; start afresh (the
                # snapshots still serve prefix reuse)
                self._ctx.reset()
                self._input_ids = []
                self._last_logits = None
                self._all_logits = _NO_ROWS
            raise

    def cancel(self) -> None:
        """Stop a running generation or evaluation from another thread (or a signal handler):
        the engine stops at its next graph node and the call raises :class:`sambay.AbortedError`.
        The Llama stays usable: tokens evaluated before stay, and a micro-batch cut in the middle
        resets the context (the next call re-evaluates its prompt, reusing snapshots)."""
        self._ctx.cancel()

    def _reusable(self, tokens: Sequence[int]) -> Union[None, "LlamaState", list[int]]:
        """What a prompt of ``tokens`` can start from: the evaluated tokens when they are a
        prefix (``self._input_ids``), else the longest snapshot that is one, else None (Mamba
        state cannot rewind, so a shorter match means restoring a snapshot)."""
        cur = self._input_ids
        if (len(cur) <= len(tokens) and list(tokens[: len(cur)]) == cur and
                (self._last_logits is not None or not cur)):
            return cur
        best: Optional[LlamaState] = None
        for snap in self._snapshots:
            n = snap.n_tokens
            if n <= len(tokens) and list(snap.input_ids) == list(tokens[:n]) and (
                    best is None or n > best.n_tokens):
                best = snap
        return best

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of the prompt ``tokens`` this Llama would not evaluate
        again (what it holds, or a snapshot): a server puts a request on the slot where this
        is largest."""
        start = self._reusable(tokens)
        return 0 if start is None else len(start) if isinstance(start, list) else start.n_tokens

    def _prepare(self, tokens: list[int]) -> int:
        """Bring the context to the state after ``tokens`` from what :meth:`_reusable` finds,
        evaluating the rest. Returns how many tokens were evaluated."""
        n_before = self.n_tokens_evaluated
        start = self._reusable(tokens)
        if isinstance(start, LlamaState):
            self.load_state(start)
        elif start is None:
            self.reset()
        self.eval(tokens[len(self._input_ids):])
        return self.n_tokens_evaluated - n_before

    def _snapshot(self) -> None:
        if self.max_snapshots == 0 or not self._input_ids:
            return
        ids = tuple(self._input_ids)
        self._snapshots = [s for s in self._snapshots if s.input_ids != ids]
        self._snapshots.append(self.save_state())
        del self._snapshots[: -self.max_snapshots]

    def generate(
        self,
        tokens: Sequence[int],
        *,
        params: Optional[SamplingParams] = None,
        seed: Optional[int] = None,
        reset: bool = True,
        force: Optional[Callable[[], Optional[int]]] = None,
        constraint: Optional[GrammarConstraint] = None,
        logits_processor: Optional[LogitsProcessor] = None,
        logit_bias: Optional[dict[Any, float]] = None,
        **overrides: Any,
    ) -> Generator[int, None, None]:
        """Yield sampled token ids after evaluating ``tokens``, forever (the caller stops).

        The prompt reuses what the context already holds when possible (see ``_prepare``),
        and a snapshot of the state after the prompt is kept for later prompts that extend it.

        Args:
            tokens: the prompt ids.
            params: sampling parameters (default: :attr:`sampling_defaults`; keyword
                ``overrides`` replace single fields).
            seed: a seed for this call (default: the Llama's generator).
            reset: accepted for llama-cpp-python compatibility; prefix reuse decides.
            force: called before each token is sampled; a token id it returns is taken
                instead of sampling (how a reasoning budget forces the trace's close tag).
            constraint: a grammar (:class:`sambay.structured.GrammarConstraint`): the tokens it
                does not allow are masked out of the logits before sampling, and every token
                taken is passed to it.
            logits_processor: llama-cpp-python's: ``(input_ids, scores) -> scores`` (a
                :class:`~sambay.sampling.LogitsProcessorList` or one callable), before sampling.
            logit_bias: ``{token id: bias}`` added to the logits before sampling.
        """
        tokens = self._check_tokens(tokens)
        if not tokens:
            raise ValueError("the prompt is empty")
        params = (params or self.sampling_defaults).with_overrides(**overrides)
        bias = check_logit_bias(logit_bias, self.n_vocab())
        with _GUARD:
            if self._generating:
                raise RuntimeError(
                    "this Llama is already generating (an unfinished stream, or another thread): finish or "
                    "close() that stream first; for work at the same time use Llama(n_seq_max=N).sequence(i) "
                    "or another Llama")
            self._generating = True
        try:
            yield from self._generate(tokens, params, seed, force, constraint, logits_processor, bias)
        finally:
            self._generating = False

    def _generate(self, tokens: list[int], params: SamplingParams, seed: Optional[int],
                  force: Optional[Callable[[], Optional[int]]], constraint: Optional[GrammarConstraint],
                  logits_processor: Optional[LogitsProcessor], bias: Any) -> Iterator[int]:
        mirostat = MirostatState(params) if params.mirostat else None
        rng = make_rng(seed) if seed is not None else self._rng
        self._ctx.clear_cancel()  # a cancel() that came after the previous call ended
        t0 = time.perf_counter()
        evaluated = self._prepare(tokens)
        self._snapshot()
        self.last_timings = Timings(prompt_tokens=len(tokens), prompt_evaluated=evaluated,
                                    prompt_seconds=time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            while True:
                assert self._last_logits is not None
                forced = force() if force is not None else None
                if forced is None and constraint is not None:
                    forced = constraint.forced()
                if forced is not None:
                    token = forced
                else:
                    logits = adjust_logits(self._last_logits, self._input_ids, logits_processor=logits_processor,
                                           logit_bias=bias,
                                           bitmask=constraint.bitmask() if constraint is not None else None)
                    token = sample(logits, params, rng, self._input_ids, mirostat)
                if constraint is not None:
                    constraint.accept(token)
                self.last_timings.generated_tokens += 1
                self.last_timings.generate_seconds = time.perf_counter() - t1
                yield token
                if len(self._input_ids) >= self.n_ctx():
                    return
                self.eval([token])
        finally:
            if self._shared is not None:
                self._ctx.idle()  # the batched steps stop waiting for this sequence

    # ------------------------------------------------------------------ state

    def save_state(self) -> LlamaState:
        """Snapshot of the evaluated tokens, last logits and every cache."""
        last = None if self._last_logits is None else self._last_logits.copy()
        return LlamaState(tuple(self._input_ids), last, bytes(self._ctx.save_state()))

    def load_state(self, state: LlamaState) -> None:
        """Restore a snapshot from :meth:`save_state` (of this or another Llama on the same
        model file).

        Raises:
            StateError: the state comes from another model or KV type, or its ``input_ids``
                are not the tokens the engine state was saved after; nothing changes then.
        """
        self._ctx.load_state(state.engine_state, tokens=state.input_ids)
        self._input_ids = list(state.input_ids)
        self._last_logits = None if state.last_logits is None else state.last_logits.copy()
        self._all_logits = _NO_ROWS

    # ------------------------------------------------------------------ completion

    def _prompt_tokens(self, prompt: Prompt, *, special: bool) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            return self.tokenize(prompt, special=special)
        if isinstance(prompt, Sequence) and not isinstance(prompt, str):  # (str: for mypy's narrowing)
            return self._check_tokens(prompt)
        raise ValueError(f"prompt must be a str, bytes or a list of token ids, got {type(prompt).__name__}")

    def _completion_stream(
        self,
        prompt_tokens: list[int],
        *,
        max_tokens: Optional[int],
        params: SamplingParams,
        stop: Sequence[str],
        seed: Optional[int],
        logprobs: Optional[int],
        echo: bool,
        prompt_text: str,
        force: Optional[Callable[[], Optional[int]]] = None,
        constraint: Optional[GrammarConstraint] = None,
        logits_processor: Optional[LogitsProcessor] = None,
        logit_bias: Optional[dict[Any, float]] = None,
        stopping_criteria: Optional[StoppingCriteria] = None,
    ) -> Iterator[tuple[str, Optional[dict[str, Any]], Optional[str]]]:
        """Yield (text, logprobs piece, finish_reason) triples; the last has the reason."""
        self._ctx.check_fits(len(prompt_tokens))
        if echo and logprobs is not None and not self.logits_all:
            raise ValueError("echo with logprobs needs the prompt's logits: create the Llama with logits_all=True")
        # no max_tokens: until the context is full (generate() ends there)
        budget = max_tokens if max_tokens is not None and max_tokens > 0 else None
        tok = self.tokenizer
        decoder = StreamDecoder(tok)
        stops = StopStringFilter(stop)
        text_offset = len(prompt_text) if echo else 0

        if echo:
            lp = None
            if logprobs is not None:
                # prompt logprobs need every prompt row: evaluate the prompt afresh
                self.reset()
                self.eval(prompt_tokens)
                lp = self._prompt_logprobs(prompt_tokens, logprobs)
            yield prompt_text, lp, None
        count = 0
        for token in self.generate(prompt_tokens, params=params, seed=seed, force=force,
                                   constraint=constraint, logits_processor=logits_processor,
                                   logit_bias=logit_bias):
            if token in tok.eog_ids:
                yield stops.feed(decoder.flush()) + stops.flush(), None, "stop"
                return
            count += 1
            piece = stops.feed(decoder.feed(token))
            last_logits = self._last_logits  # the logits this token was sampled from
            assert last_logits is not None
            lp = None
            if logprobs is not None:
                lp = self._token_logprobs(last_logits, token, logprobs, text_offset)
                text_offset += len(piece)
            # llama-cpp-python's check: the evaluated tokens (not yet this one) and its logits
            if stops.stopped or (stopping_criteria is not None and stopping_criteria(
                    np.asarray(self._input_ids, dtype=np.intc), last_logits)):
                if not stops.stopped:
                    piece += stops.feed(decoder.flush()) + stops.flush()
                yield piece, lp, "stop"
                return
            if budget is not None and count >= budget:
                yield piece + stops.feed(decoder.flush()) + stops.flush(), lp, "length"
                return
            yield piece, lp, None
        yield stops.feed(decoder.flush()) + stops.flush(), None, "length"  # context full

    def _token_logprobs(self, logits: np.ndarray, token: int, top: int, offset: int) -> dict[str, Any]:
        lps = log_softmax(logits)
        tok = self.tokenizer
        name = tok.token_bytes(token, special=True).decode("utf-8", errors="replace")
        best: Sequence[int] = _core.top_k_indices(lps, top).tolist() if top > 0 else []
        return {
            "tokens": [name],
            "text_offset": [offset],
            "token_logprobs": [float(lps[token])],
            "top_logprobs": [{tok.token_bytes(int(i), special=True).decode("utf-8", errors="replace"):
                              float(lps[int(i)]) for i in best}],
        }

    def _prompt_logprobs(self, tokens: list[int], top: int) -> dict[str, Any]:
        """Logprobs of each prompt token given the ones before (the first has none), from the
        rows of the eval that just ran the whole prompt."""
        out: dict[str, list[Any]] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        offset = 0
        tok = self.tokenizer
        rows = self._all_logits
        assert len(rows) == len(tokens)
        for i, t in enumerate(tokens):
            piece = tok.token_bytes(t, special=True).decode("utf-8", errors="replace")
            if i == 0:
                out["tokens"].append(piece)
                out["text_offset"].append(offset)
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                one = self._token_logprobs(rows[i - 1], t, top, offset)
                for k in out:
                    out[k].extend(one[k])
            offset += len(piece)
        return out

    def create_completion(
        self,
        prompt: Prompt,
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, Sequence[str]]] = None,
        frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        top_k: Optional[int] = None,
        stream: bool = False,
        seed: Optional[int] = None,
        model: Optional[str] = None,
        response_format: Optional[dict[str, Any]] = None,
        grammar: Optional[str] = None,
        json_schema: Optional[Union[dict[str, Any], str]] = None,
        penalty_last_n: Optional[int] = None,
        typical_p: Optional[float] = None,
        mirostat_mode: Optional[int] = None,
        mirostat_tau: Optional[float] = None,
        mirostat_eta: Optional[float] = None,
        logit_bias: Optional[dict[Any, float]] = None,
        logits_processor: Optional[LogitsProcessor] = None,
        stopping_criteria: Optional[StoppingCriteria] = None,
    ) -> Union[dict[str, Any], Iterator[dict[str, Any]]]:
        """Complete ``prompt`` (OpenAI ``text_completion`` shape; llama-cpp-python's args).

        Returns a dict ``{id, object, created, model, choices: [{text, index, logprobs,
        finish_reason}], usage}``, or with ``stream=True`` a generator of chunks whose
        ``choices[0].text`` are the new pieces (the last chunk carries ``finish_reason``).
        Generation stops at an end-of-generation token (``finish_reason`` "stop"), at a stop
        string (never shown, not even partly while streaming), or after ``max_tokens``
        (``None`` or <= 0: until the context is full; "length"). A sampling argument left
        ``None`` takes :attr:`sampling_defaults` (the model file's recommended settings).

        Structured output (needs ``pip install "sambay[structured]"``): ``response_format``
        (``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema":
        ...}}``), ``json_schema`` (a JSON Schema) or ``grammar`` (a GBNF grammar) restricts the
        text to what they allow (see :mod:`sambay.structured`).

        As in llama-cpp-python: ``logit_bias`` (``{token id: bias}``, added to the logits),
        ``logits_processor`` (``(input_ids, scores) -> scores``, e.g. a
        :class:`~sambay.sampling.LogitsProcessorList`) and ``stopping_criteria``
        (``(input_ids, logits) -> bool``, checked after each token; True ends the text there
        with ``finish_reason`` "stop").

        Raises:
            ValueError: invalid arguments or invalid token ids.
            sambay.structured.GrammarError: an invalid schema or grammar (a ValueError).
            ContextFullError: a prompt longer than n_ctx (also a ValueError).
        """
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model")
        if logprobs is not None:
            _check_int("logprobs", logprobs, 0)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise ValueError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        stops = _stop_strings(stop)
        params = self.sampling_defaults.with_overrides(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n, typical_p=typical_p,
            mirostat=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta)
        compiled = compile_grammar(response_format=response_format, json_schema=json_schema, grammar=grammar)
        constraint = None if compiled is None else GrammarConstraint(compiled, self.tokenizer, self.n_vocab())
        prompt_tokens = self._prompt_tokens(prompt, special=False)
        if not prompt_tokens:
            raise ValueError("the prompt is empty (it has no tokens)")
        prompt_text = (prompt.decode("utf-8", errors="replace") if isinstance(prompt, bytes)
                       else prompt if isinstance(prompt, str)
                       else self.detokenize(prompt_tokens).decode("utf-8", errors="replace"))
        cid = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model or self.model_path
        pieces = self._completion_stream(
            prompt_tokens, max_tokens=max_tokens, params=params, stop=stops, seed=seed,
            logprobs=logprobs, echo=echo, prompt_text=prompt_text, constraint=constraint,
            logits_processor=logits_processor, logit_bias=logit_bias, stopping_criteria=stopping_criteria,
        )

        def chunk(text: str, lp: Optional[dict[str, Any]], reason: Optional[str]) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}]}

        if stream:
            return (chunk(text, lp, reason) for text, lp, reason in pieces)

        texts: list[str] = []
        merged: Optional[dict[str, list[Any]]] = None
        reason: Optional[str] = None
        for text, lp, reason in pieces:
            texts.append(text)
            if lp is not None:
                merged = merged or {k: [] for k in lp}
                for k in lp:
                    merged[k].extend(lp[k])
        out = chunk("".join(texts), merged, reason)
        n_gen = self.last_timings.generated_tokens
        out["usage"] = {"prompt_tokens": len(prompt_tokens), "completion_tokens": n_gen,
                        "total_tokens": len(prompt_tokens) + n_gen}
        return out

    __call__ = create_completion

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja source chats are rendered with: the constructor's ``chat_template`` (or
        ``chat_format``) if given, else the GGUF's ``tokenizer.chat_template``; None without
        either."""
        return self._chat_source

    @property
    def chat_formatter(self) -> ChatFormatter:
        """The formatter for :attr:`chat_template`.

        Raises:
            ValueError: there is no chat template (neither given nor in the GGUF).
        """
        if self._chat is None:
            template = self._chat_source
            if not template:
                raise ValueError("the GGUF has no tokenizer.chat_template (and none was given: chat_template=); "
                                 "use create_completion")
            tok = self.tokenizer

            def text(tid: Optional[int]) -> str:
                return "" if tid is None else tok.token_bytes(tid, special=True).decode("utf-8", "replace")

            self._chat = ChatFormatter(template, eos_token=text(tok.eos_id), bos_token=text(tok.bos_id))
        return self._chat

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: Optional[Sequence[Any]] = None,
                    chat_template_kwargs: Optional[dict[str, Any]] = None) -> tuple[str, list[int]]:
        """The prompt text and tokens a conversation is answered from (the GGUF's chat
        template with the generation prompt; a ``reasoning_content`` sent back in the history
        is never rendered).

        Raises:
            sambay.ChatTemplateError: bad messages or a failing template.
        """
        history = messages  # the template's checks report anything that is not a message list
        if isinstance(messages, (list, tuple)):
            history = [{k: v for k, v in m.items() if k != "reasoning_content"} if isinstance(m, dict) else m
                       for m in messages]
        extra = dict(chat_template_kwargs or {})
        reserved = sorted(set(extra) & {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                        "range", "raise_exception"})
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
        prompt = self.chat_formatter.render(history, add_generation_prompt=True, tools=tools, **extra)
        return prompt, self.tokenize(prompt, special=True)

    def create_chat_completion(
        self,
        messages: Sequence[dict[str, Any]],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        stream: bool = False,
        stop: Optional[Union[str, Sequence[str]]] = None,
        seed: Optional[int] = None,
        max_tokens: Optional[int] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        logprobs: bool = False,
        top_logprobs: Optional[int] = None,
        tools: Optional[Sequence[Any]] = None,
        model: Optional[str] = None,
        reasoning_format: str = "deepseek",
        reasoning_budget: Optional[int] = None,
        reasoning_effort: Optional[str] = None,
        response_format: Optional[dict[str, Any]] = None,
        grammar: Optional[str] = None,
        json_schema: Optional[Union[dict[str, Any], str]] = None,
        penalty_last_n: Optional[int] = None,
        typical_p: Optional[float] = None,
        mirostat_mode: Optional[int] = None,
        mirostat_tau: Optional[float] = None,
        mirostat_eta: Optional[float] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        logit_bias: Optional[dict[Any, float]] = None,
        logits_processor: Optional[LogitsProcessor] = None,
        stopping_criteria: Optional[StoppingCriteria] = None,
    ) -> Union[dict[str, Any], Iterator[dict[str, Any]]]:
        """Answer a conversation (OpenAI ``chat.completion`` shape).

        The GGUF's chat template renders ``messages`` (sandboxed Jinja, as transformers
        renders it) with the generation prompt; generation stops at the model's
        end-of-generation tokens. Sampling arguments left ``None`` take
        :attr:`sampling_defaults`. With ``stream=True``, chunks carry ``delta`` =
        ``{"role": "assistant"}`` first, then ``{"reasoning_content": ...}`` and
        ``{"content": ...}`` pieces, then an empty delta with the ``finish_reason``.

        Args:
            reasoning_format: ``"deepseek"``: the ``<think>`` trace goes to
                ``message.reasoning_content`` (``delta.reasoning_content`` when streaming) and
                only the answer to ``content``; a trace cut by ``max_tokens`` is still
                reasoning (``finish_reason`` "length"). ``"none"``: the text as the model
                wrote it, all in ``content``.
            reasoning_budget: end the trace after this many tokens by forcing ``</think>``,
                so the answer still comes (None: unlimited; 0: close it at once).
            reasoning_effort: OpenAI's ``"low"``, ``"medium"`` or ``"high"``, mapped to
                budgets (:data:`sambay.reasoning.EFFORT_BUDGETS`); ``reasoning_budget`` wins.
            response_format, json_schema, grammar: structured output, as for
                :meth:`create_completion`. The constraint applies to the answer: a ``<think>``
                trace (opened by the prompt or by the reply's first token) stays free, and the
                grammar starts after ``</think>``.
            penalty_last_n: how many recent tokens the penalties look at (llama.cpp's
                ``repeat_last_n``; also on :meth:`create_completion`).
            typical_p: locally typical sampling's probability mass (1: off; also on
                :meth:`create_completion`).
            mirostat_mode, mirostat_tau, mirostat_eta: llama.cpp's Mirostat (mode 1) or
                Mirostat 2.0 (mode 2) instead of top-k/typical/top-p/min-p, aiming at ``tau``
                bits of surprise with learning rate ``eta`` (also on :meth:`create_completion`).
            chat_template_kwargs: extra variables for the chat template (as transformers'
                ``apply_chat_template(**kwargs)``); they cannot replace ``messages``, ``tools``,
                ``add_generation_prompt`` or the special-token names.
            logit_bias, logits_processor, stopping_criteria: as for :meth:`create_completion`.

        A ``reasoning_content`` in the given assistant messages is never rendered into the
        prompt (the template sees ``content`` only).

        Raises:
            sambay.ChatTemplateError: bad messages or a failing template.
            ValueError: invalid arguments.
            ContextFullError: a conversation longer than n_ctx (also a ValueError).
        """
        check_reasoning_format(reasoning_format)
        budget = resolve_budget(reasoning_budget, reasoning_effort)
        compiled = compile_grammar(response_format=response_format, json_schema=json_schema, grammar=grammar)
        prompt, prompt_tokens = self.chat_prompt(messages, tools=tools, chat_template_kwargs=chat_template_kwargs)
        n_top = (top_logprobs or 0) if logprobs else None
        stops = _stop_strings(stop)
        params = self.sampling_defaults.with_overrides(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n, typical_p=typical_p,
            mirostat=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta)
        split = reasoning_format == "deepseek"
        splitter = ReasoningSplitter(started=prompt_opens_trace(prompt))
        constraint = None
        if compiled is not None:
            constraint = GrammarConstraint(
                compiled, self.tokenizer, self.n_vocab(), trace="open" if prompt_opens_trace(prompt) else "maybe",
                open_tokens=self.tokenize(THINK_OPEN, special=True))
        force = None
        if budget is not None:
            force = ReasoningBudget(budget, splitter, self.tokenize(FORCED_CLOSE, special=True)).next_forced
        pieces = self._completion_stream(
            prompt_tokens, max_tokens=max_tokens, params=params, stop=stops, seed=seed,
            logprobs=n_top, echo=False, prompt_text=prompt, force=force, constraint=constraint,
            logits_processor=logits_processor, logit_bias=logit_bias, stopping_criteria=stopping_criteria,
        )

        def parts() -> Iterator[tuple[str, str, Optional[dict[str, Any]], Optional[str]]]:
            """(reasoning, content, logprobs, finish_reason) per piece; the splitter always
            runs (a budget needs to know when the trace is open)."""
            for text, lp, reason in pieces:
                r, c = splitter.feed(text)
                if reason is not None:
                    r2, c2 = splitter.flush()
                    r, c = r + r2, c + c2
                yield (r, c, lp, reason) if split else ("", text, lp, reason)

        cid = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model or self.model_path

        def lp_content(lp: Optional[dict[str, Any]]) -> Optional[list[dict[str, Any]]]:
            if lp is None:
                return None
            return [{"token": t, "logprob": l, "bytes": list(t.encode("utf-8")),
                     "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode("utf-8"))}
                                      for k, v in (top or {}).items()]}
                    for t, l, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]

        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                            "logprobs": None, "finish_reason": None}]}
                for r, c, lp, reason in parts():
                    deltas = ([{"reasoning_content": r}] if r else []) + ([{"content": c}] if c else [])
                    for i, delta in enumerate(deltas):
                        last = i == len(deltas) - 1  # a piece's logprobs go with its last delta
                        yield {**base, "choices": [{"index": 0, "delta": delta,
                                                    "logprobs": ({"content": lp_content(lp)} if lp and last else None),
                                                    "finish_reason": None}]}
                    if reason is not None:
                        yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": reason}]}
            return chunks()

        reasoning: list[str] = []
        texts: list[str] = []
        content_lp: list[dict[str, Any]] = []
        reason: Optional[str] = None
        for r, c, lp, reason in parts():
            reasoning.append(r)
            texts.append(c)
            content_lp.extend(lp_content(lp) or [])
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if split and splitter.reasoning_seen:
            message["reasoning_content"] = "".join(reasoning)
        n_gen = self.last_timings.generated_tokens
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": content_lp} if logprobs else None,
                         "finish_reason": reason}],
            "usage": {"prompt_tokens": len(prompt_tokens), "completion_tokens": n_gen,
                      "total_tokens": len(prompt_tokens) + n_gen},
        }

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the context and the model; using the object afterwards raises ValueError."""
        self._snapshots = []
        self._ctx = _CLOSED
        self._model = _CLOSED

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
