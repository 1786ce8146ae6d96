"""Pure text helpers for streaming: stop strings without leaking partial matches."""

from __future__ import annotations

from typing import Optional, Sequence


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest complete stop string starts in ``text``, or None."""
    best: Optional[int] = None
    for s in stops:
        if s:
            i = text.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is the start of a stop string.

    That tail must be held back while streaming: the next tokens may complete the stop string,
    and then it must never have been shown.
    """
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class StopStringFilter:
    """Feed text pieces; get back what is safe to show. ``stopped`` turns true at a match.

    >>> f = StopStringFilter(["</s>"])
    >>> f.feed("Hello </"), f.feed("s> world"), f.stopped
    ('Hello ', '', True)
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._pending = ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._pending + piece
        cut = find_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = partial_stop_len(text, self.stops)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What was held back, at the end of generation (no stop string came)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
