"""The reasoning trace kept apart from the answer, and a budget for it.

Phi-4-mini-flash-reasoning answers ``<think>TRACE</think>ANSWER``. With the ``"deepseek"``
reasoning format (llama-server's ``--reasoning-format deepseek``, the shape OpenAI-compatible
reasoning servers use) the trace travels as ``reasoning_content`` and only the answer as
``content``; ``"none"`` keeps the text as the model wrote it. The Python API, the server and the
CLI all split with :class:`ReasoningSplitter`, and bound the trace with :class:`ReasoningBudget`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ._stream import partial_stop_len

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_FORMATS = ("deepseek", "none")
# what a budget forces when the trace runs out: the close tag alone (the model then writes
# its answer in its own layout)
FORCED_CLOSE = THINK_CLOSE
# OpenAI's reasoning_effort as trace budgets in tokens (the model card's examples think for
# thousands of tokens; "high" leaves a long trace its room)
EFFORT_BUDGETS: dict[str, int] = {"low": 1024, "medium": 4096, "high": 16384}


def check_reasoning_format(value: str) -> str:
    """``value`` if it is a known reasoning format.

    Raises:
        ValueError: any other value.
    """
    if value not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, got {value!r}")
    return value


def resolve_budget(reasoning_budget: Optional[int], reasoning_effort: Optional[str]) -> Optional[int]:
    """The trace budget in tokens (None: unlimited) from an explicit budget or OpenAI's
    ``reasoning_effort``; an explicit budget wins.

    Raises:
        ValueError: a negative budget or an unknown effort.
    """
    if reasoning_budget is not None:
        if isinstance(reasoning_budget, bool) or not isinstance(reasoning_budget, int) or reasoning_budget < 0:
            raise ValueError(f"reasoning_budget must be an integer >= 0 or None, got {reasoning_budget!r}")
        return reasoning_budget
    if reasoning_effort is None:
        return None
    if reasoning_effort not in EFFORT_BUDGETS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(EFFORT_BUDGETS)}, got {reasoning_effort!r}")
    return EFFORT_BUDGETS[reasoning_effort]


def prompt_opens_trace(prompt: str) -> bool:
    """Whether a rendered chat prompt ends inside an opened trace (templates that put
    ``<think>`` in the generation prompt): then the reply starts as reasoning."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningSplitter:
    """Feed the reply's text pieces; get ``(reasoning, content)`` pieces that are safe to show.

    A reply is reasoning when it opens with ``<think>`` (leading whitespace allowed) or when
    the prompt opened the trace (``started``); the trace ends at ``</think>``, and the answer's
    leading whitespace is dropped. Text that may still turn into a tag is held back, so a tag is
    never shown, not even partly. Without an opening tag the whole reply is content.

    >>> s = ReasoningSplitter()
    >>> s.feed("<thi"), s.feed("nk>2+2</th"), s.feed("ink>\\n4")
    (('', ''), ('2+2', ''), ('', '4'))
    """

    def __init__(self, *, started: bool = False) -> None:
        self._state = "thinking" if started else "start"  # start -> thinking -> answer
        self._pending = ""
        self.reasoning_seen = False  # a trace was opened (its text may still be empty)

    @property
    def thinking(self) -> bool:
        """Inside the trace (between the tags)."""
        return self._state == "thinking"

    def feed(self, piece: str) -> tuple[str, str]:
        text = self._pending + piece
        self._pending = ""
        reasoning, content = "", ""
        while text:
            if self._state == "start":
                stripped = text.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._state, text = "thinking", stripped[len(THINK_OPEN):]
                    self.reasoning_seen = True
                elif THINK_OPEN.startswith(stripped):  # may still become the tag
                    self._pending = text
                    return reasoning, content
                else:
                    self._state = "answer"
            elif self._state == "thinking":
                self.reasoning_seen = True
                cut = text.find(THINK_CLOSE)
                if cut >= 0:
                    reasoning += text[:cut]
                    self._state, text = "after", text[cut + len(THINK_CLOSE):]
                    continue
                hold = partial_stop_len(text, [THINK_CLOSE])
                reasoning += text[: len(text) - hold]
                self._pending = text[len(text) - hold:]
                return reasoning, content
            elif self._state == "after":  # the answer's leading whitespace
                text = text.lstrip()
                if text:
                    self._state = "answer"
            else:
                content += text
                text = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What was held back, at the end of the reply (an unterminated trace stays reasoning)."""
        text, self._pending = self._pending, ""
        if self._state == "thinking":
            return text, ""
        return "", text if self._state in ("start", "answer") else ""


class ReasoningBudget:
    """Ends the trace after ``budget`` tokens by forcing :data:`FORCED_CLOSE`.

    ``next_forced`` is called before each token is sampled (``Llama.generate``'s ``force``):
    while the splitter is inside the trace it counts, and once ``budget`` trace tokens were
    generated it returns the close tag's token ids one by one instead of letting the sampler
    choose. ``close_tokens`` are the tag's ids (tokenized once, with special tokens parsed).
    """

    def __init__(self, budget: int, splitter: ReasoningSplitter, close_tokens: Sequence[int]) -> None:
        self.budget = budget
        self.splitter = splitter
        self.close_tokens = list(close_tokens)
        self.n_thinking = 0  # trace tokens generated so far
        self._queue: list[int] = []
        self.forced = False  # the budget ran out and the close tag was forced

    def next_forced(self) -> Optional[int]:
        if self._queue:
            return self._queue.pop(0)
        if not self.splitter.thinking or self.forced:
            return None
        if self.n_thinking >= self.budget:
            self.forced = True
            self._queue = list(self.close_tokens)
            return self._queue.pop(0) if self._queue else None
        self.n_thinking += 1
        return None


ForceHook = Callable[[], Optional[int]]

__all__ = ["EFFORT_BUDGETS", "FORCED_CLOSE", "REASONING_FORMATS", "THINK_CLOSE", "THINK_OPEN",
           "ReasoningBudget", "ReasoningSplitter", "check_reasoning_format", "prompt_opens_trace",
           "resolve_budget"]
