"""Token sampling with llama.cpp's semantics, on NumPy.

The chain, as llama-cpp-python runs it: repetition/frequency/presence penalties over the last
``penalty_last_n`` tokens, then top-k, locally typical (``typical_p``), top-p and min-p on the
temperature-1 distribution, then
temperature, then a draw from a seeded generator. ``temperature <= 0`` is greedy (argmax after
the penalties). With ``mirostat`` 1 or 2 (llama.cpp's Mirostat samplers) the truncation is
Mirostat's instead: penalties, temperature, then Mirostat, which keeps its target surprise
``mu`` across the tokens of one generation (:class:`MirostatState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np


# a GGUF's recommended settings (gguf-py's ``general.sampling.*`` keys) -> SamplingParams fields
FILE_KEYS: dict[str, str] = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "penalty_last_n",
}


@dataclass(frozen=True)
class SamplingParams:
    """Every sampling knob, defined once (defaults as in llama-cpp-python's completion; a
    model file's recommended settings replace them: :meth:`from_metadata`)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    typical_p: float = 1.0
    mirostat: int = 0  # 0: off, 1: Mirostat, 2: Mirostat 2.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "typical_p", "mirostat_tau", "mirostat_eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "penalty_last_n", "mirostat"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.mirostat not in (0, 1, 2):
            raise ValueError(f"mirostat must be 0 (off), 1 or 2, got {self.mirostat}")
        if not 0.0 <= self.typical_p <= 1.0:
            raise ValueError(f"typical_p must be in [0, 1], got {self.typical_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0.0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0, got {self.penalty_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "SamplingParams":
        """The defaults with a GGUF's ``general.sampling.*`` values (:data:`FILE_KEYS`) put in.

        Raises:
            ValueError: the file's values are out of range.
        """
        kinds = {f.name: f.type for f in fields(cls)}
        keys = {name: key for key, name in FILE_KEYS.items()}
        values: dict[str, Any] = {}
        for name, v in file_sampling(metadata).items():
            try:
                # GGUF floats are F32: the shortest decimal that reads back as that F32 (0.95,
                # not 0.949999988...)
                values[name] = int(v) if kinds[name] in ("int", int) else float(str(np.float32(v)))
            except (TypeError, ValueError):
                raise ValueError(f"{keys[name]}: not a number: {v!r}") from None
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"the file's recommended sampling (general.sampling.*): {err}") from None

    def with_overrides(self, **overrides: Any) -> "SamplingParams":
        """A copy with the given fields replaced; ``None`` values are left out (so an argument
        nobody gave keeps the default, and one that was given always wins)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self


def file_sampling(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields a GGUF's metadata recommends (``{"temperature": 0.6, ...}``)."""
    return {name: metadata[key] for key, name in FILE_KEYS.items() if key in metadata}


def apply_penalties(logits: np.ndarray, recent: Sequence[int], params: SamplingParams) -> np.ndarray:
    """``logits`` with llama.cpp's penalties for the recent tokens applied (a copy when
    anything changes; the input is never modified).

    For each token seen c > 0 times among the last ``penalty_last_n``: a positive logit is
    divided by ``repeat_penalty`` and a negative one multiplied by it; then
    ``c * frequency_penalty + presence_penalty`` is subtracted.
    """
    if (params.penalty_last_n == 0 or len(recent) == 0 or (
            params.repeat_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0)):
        return np.asarray(logits, dtype=np.float32)  # nothing to change: no copy
    out = np.array(logits, dtype=np.float32, copy=True)
    window = np.asarray(recent[-params.penalty_last_n:], dtype=np.int64)
    ids, counts = np.unique(window, return_counts=True)
    vals = out[ids]
    vals = np.where(vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty)
    vals -= counts * params.frequency_penalty + params.presence_penalty
    out[ids] = vals
    return out


def candidates(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Token ids that survive top-k, top-p and min-p, most likely first (never empty)."""
    n_vocab = logits.shape[0]
    total = None  # the softmax normaliser when the candidate set is not the whole distribution
    if 0 < params.top_k < n_vocab:
        from ._native import _core  # one pass with a small heap: ~10x faster than argpartition

        order = _core.top_k_indices(logits, params.top_k).astype(np.int64)
    elif params.min_p > 0.0:
        # min-p keeps p >= min_p * p_max, i.e. logit >= max + log(min_p): filter before sorting
        peak = float(logits.max())
        keep = np.flatnonzero(logits >= peak + np.log(params.min_p))
        order = keep[np.argsort(-logits[keep], kind="stable")]
        # top-p still needs probabilities over the whole vocabulary
        total = float(np.exp(logits.astype(np.float64) - peak).sum())
    else:
        order = np.argsort(-logits, kind="stable")
    if params.typical_p < 1.0:
        order, total = _typical(logits, order, params.typical_p), None
    if params.top_p >= 1.0 and params.min_p <= 0.0:
        return order
    top = logits[order].astype(np.float64)
    probs = np.exp(top - top[0])
    probs /= probs.sum() if total is None else total
    n = len(order)
    if params.top_p < 1.0:
        n = min(n, int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1)
    if params.min_p > 0.0:
        n = min(n, max(1, int(np.count_nonzero(probs >= params.min_p * probs[0]))))
    return order[: max(1, n)]


def _typical(logits: np.ndarray, order: np.ndarray, p: float) -> np.ndarray:
    """Locally typical sampling (llama.cpp's ``typical``): of the candidates ``order``, keep
    those whose surprise is closest to the distribution's entropy, up to probability mass
    ``p`` (at least one); most likely first again."""
    x = logits[order].astype(np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    logp = np.log(np.maximum(probs, np.finfo(np.float64).tiny))
    entropy = -float(np.sum(probs * logp))
    by_typicality = np.argsort(np.abs(-logp - entropy), kind="stable")
    n = int(np.searchsorted(np.cumsum(probs[by_typicality]), p, side="right")) + 1  # llama.cpp: sum > p
    kept = np.sort(by_typicality[: max(1, n)])  # positions in order: sorted = most likely first
    return order[kept]


class MirostatState:
    """Mirostat's running target surprise ``mu`` (bits), for the tokens of one generation."""

    def __init__(self, params: SamplingParams) -> None:
        self.mu = 2.0 * params.mirostat_tau


def _mirostat(scaled: np.ndarray, params: SamplingParams, rng: np.random.Generator,
              state: MirostatState) -> int:
    """llama.cpp's Mirostat (1) and Mirostat 2.0 (2) on temperature-scaled logits."""
    order = np.argsort(-scaled, kind="stable")
    x = scaled[order].astype(np.float64)
    probs = np.exp(x - x[0])
    probs /= probs.sum()
    tiny = np.finfo(np.float64).tiny
    if params.mirostat == 1:
        # the Zipf exponent s_hat from the m = 100 most likely tokens, then the top k for mu
        m = min(100, len(probs)) - 1
        i = np.arange(m, dtype=np.float64)
        t = np.log((i + 2) / (i + 1))
        b = np.log(np.maximum(probs[:m], tiny) / np.maximum(probs[1:m + 1], tiny))
        s_hat = float(np.sum(t * b) / np.sum(t * t)) if m > 0 else 1.0
        eps = s_hat - 1.0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            k = float(np.power(eps * np.power(2.0, state.mu) / (1.0 - np.power(-eps, float(len(probs)))),
                               1.0 / s_hat))
        n = len(probs) if k == math.inf else max(1, int(k)) if math.isfinite(k) else 1
    else:  # the tokens whose surprise -log2 p is at most mu
        n = int(np.count_nonzero(-np.log2(np.maximum(probs, tiny)) <= state.mu))
    n = min(max(1, n), len(probs))
    kept = probs[:n] / probs[:n].sum()
    idx = int(rng.choice(n, p=kept))
    state.mu -= params.mirostat_eta * (-math.log2(kept[idx]) - params.mirostat_tau)
    return int(order[idx])


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    recent: Sequence[int] = (),
    mirostat: Optional[MirostatState] = None,
) -> int:
    """Draw the next token id from one row of logits (``mirostat``: the state Mirostat keeps
    across one generation's tokens; needed when ``params.mirostat`` is on)."""
    adjusted = apply_penalties(logits, recent, params)
    if params.greedy:
        return int(np.argmax(adjusted))
    if params.mirostat:
        if mirostat is None:
            raise ValueError("mirostat sampling needs a MirostatState")
        return _mirostat(adjusted / np.float32(params.temperature), params, rng, mirostat)
    cand = candidates(adjusted, params)
    if len(cand) == 1:
        return int(cand[0])
    scaled = adjusted[cand].astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(cand[rng.choice(len(cand), p=probs)])


class LogitsProcessorList(list):
    """llama-cpp-python's ``LogitsProcessorList``: callables ``(input_ids, scores) -> scores``
    applied in turn (``input_ids``: the evaluated tokens, ``scores``: the next token's logits)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    """llama-cpp-python's ``StoppingCriteriaList``: callables ``(input_ids, logits) -> bool``;
    generation stops once any says so."""

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any(criterion(input_ids, logits) for criterion in self)


LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


def check_logit_bias(bias: Optional[Mapping[Any, Any]], n_vocab: int) -> dict[int, float]:
    """``bias`` as ``{token id: float}`` (OpenAI's JSON gives the ids as strings).

    Raises:
        ValueError: a key that is not a token id, or a value that is not a finite number.
    """
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: {key!r} is not a token id") from None
        if isinstance(key, (bool, float)) or not 0 <= tid < n_vocab:
            raise ValueError(f"logit_bias: {key!r} is not a token id (n_vocab is {n_vocab})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"logit_bias[{key!r}] must be a finite number, got {value!r}")
        out[tid] = float(value)
    return out


def adjust_logits(logits: np.ndarray, input_ids: Sequence[int], *,
                  logits_processor: Optional[LogitsProcessor] = None,
                  logit_bias: Optional[Mapping[int, float]] = None,
                  bitmask: Optional[np.ndarray] = None) -> np.ndarray:
    """The logits the sampler sees, in llama-cpp-python's order: the user's processors, the
    logit bias (added), then a grammar's mask (:func:`mask_logits`). ``logits`` itself is
    never modified."""
    if logits_processor is not None:
        logits = np.asarray(logits_processor(np.asarray(input_ids, dtype=np.intc), logits.copy()),
                            dtype=np.float32)
    if logit_bias:
        logits = logits.copy()
        ids = np.fromiter(logit_bias.keys(), dtype=np.int64, count=len(logit_bias))
        logits[ids] += np.fromiter(logit_bias.values(), dtype=np.float32, count=len(logit_bias))
    if bitmask is not None:
        logits = mask_logits(logits, bitmask)
    return logits


def mask_logits(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """A copy of ``logits`` with every token whose bit is 0 in ``bitmask`` (int32 words, token
    ``i`` at bit ``i % 32`` of word ``i // 32``: llguidance's layout) set to -inf; tokens past
    the mask's end are not allowed either."""
    allowed = np.unpackbits(bitmask.astype("<i4", copy=False).view(np.uint8), bitorder="little")[: logits.shape[0]].view(bool)
    if allowed.shape[0] < logits.shape[0]:
        allowed = np.concatenate([allowed, np.zeros(logits.shape[0] - allowed.shape[0], dtype=bool)])
    return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities of one row (or each row) of logits, in float32."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return (x - lse).astype(np.float32)


def make_rng(seed: Optional[int]) -> np.random.Generator:
    """A generator from a seed (None: fresh entropy)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return np.random.default_rng(seed)
