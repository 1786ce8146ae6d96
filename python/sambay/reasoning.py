"""The reasoning trace kept apart from the answer.

Phi-4-mini-flash-reasoning answers ``<think>TRACE</think>ANSWER``. With the ``"deepseek"``
reasoning format (llama-server's ``--reasoning-format deepseek``, the shape OpenAI-compatible
reasoning servers use) the trace travels as ``reasoning_content`` and only the answer as
``content``; ``"none"`` keeps the text as the model wrote it. The Python API, the server and the
CLI all split with :class:`ReasoningSplitter`.
"""

from __future__ import annotations


from ._stream import partial_stop_len

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_FORMATS = ("deepseek", "none")


def check_reasoning_format(value: str) -> str:
    """``value`` if it is a known reasoning format.

    Raises:
        ValueError: any other value.
    """
    if value not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, got {value!r}")
    return value


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


__all__ = ["REASONING_FORMATS", "THINK_CLOSE", "THINK_OPEN", "ReasoningSplitter",
           "check_reasoning_format", "prompt_opens_trace"]
