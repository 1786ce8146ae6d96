"""``sambay chat`` in a terminal: the read-answer loop, its slash commands and Ctrl-C.

- Input: ``readline`` line editing and a history file (``chat-history`` in the model cache
  folder, :func:`sambay.cache.cache_root`) on a terminal, plain ``input()`` where the platform
  has no ``readline``, lines of the stream when stdin is piped. A line ending in ``\\`` goes on
  on the next line; ``\"\"\"`` opens a block that the next ``\"\"\"`` closes.
- Ctrl-C while a reply is written stops it (:meth:`sambay.Llama.cancel`, also inside a long
  prefill) and returns to the prompt: the part of the answer already shown stays in the
  conversation; a reply stopped while still thinking leaves no turn behind. Ctrl-C at the
  prompt says how to quit, and a second one in a row quits; so do Ctrl-D and ``/bye``.
- The reply is computed in a worker thread while this one waits, so that Ctrl-C reaches
  Python at once even while the engine computes with the GIL released.
- A prefill that takes longer than :data:`PROGRESS_DELAY` seconds shows its progress on
  stderr when stderr is a terminal.
- A conversation that outgrows the context loses its oldest turns (the system message stays),
  said once on stderr; a message that cannot fit even alone is refused and not kept.
- The ``<think>`` trace is shown dimmed (or hidden) by :class:`ReplyPrinter` and stays out of
  the next turns' prompt unless asked.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from .chat import validate_messages
from .engine import AbortedError, ComputeError, StateError
from .reasoning import THINK_CLOSE, THINK_OPEN

_log = logging.getLogger("sambay")

HISTORY_FILE = "chat-history"  # in the model cache folder
HISTORY_LENGTH = 1000  # lines the history file keeps
PROMPT, CONTINUATION = ">>> ", "... "
BLOCK_QUOTE = '"""'
PROGRESS_DELAY = 1.0  # seconds a prefill runs before its progress is shown
_TICK = 0.2  # seconds between two looks at the clock while waiting for the reply

HELP = f"""commands:
  /help            this text
  /bye, /exit      quit (also Ctrl-D, or Ctrl-C twice at the prompt)
  /clear           forget the conversation (the system message stays)
  /save FILE       write the conversation to FILE (JSON: a list of messages)
  /load FILE       replace the conversation with FILE's (a list of messages, or {{"messages": [...]}})
input:
  a line ending in \\ goes on on the next line; {BLOCK_QUOTE} opens a block that {BLOCK_QUOTE} closes
  Ctrl-C while the reply is written stops it; the part of the answer shown stays in the
  conversation (a reply stopped while still thinking leaves no turn)"""


def _isatty(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class ReplyPrinter:
    """Writes a streamed chat reply: the ``<think>`` trace dimmed on a terminal (between its
    tags when the output is piped, so the text is the model's), or not at all; collects the
    trace and the answer.

    Args:
        out: the stream written to.
        show_thinking: write the trace (else it is only collected).
    """

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out: TextIO, *, show_thinking: bool) -> None:
        self.out = out
        self.show_thinking = show_thinking
        self.open, self.close = (self.DIM, self.RESET + "\n") if _isatty(out) else (THINK_OPEN, THINK_CLOSE)
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self._in_trace = False

    def write(self, delta: dict[str, Any]) -> None:
        """Write one streamed ``delta`` (its ``reasoning_content`` and ``content``)."""
        trace, answer = delta.get("reasoning_content"), delta.get("content")
        if trace:
            self.reasoning.append(trace)
            if self.show_thinking:
                if not self._in_trace:
                    self.out.write(self.open)
                    self._in_trace = True
                self.out.write(trace)
        if answer:
            self._end_trace()
            self.content.append(answer)
            self.out.write(answer)
        self.out.flush()

    def _end_trace(self) -> None:
        if self._in_trace:
            self.out.write(self.close)
            self._in_trace = False

    def finish(self) -> None:
        """End the reply (closes a trace still open, then a newline)."""
        self._end_trace()
        self.out.write("\n")
        self.out.flush()

    def history_text(self, keep_thinking: bool) -> str:
        """The reply as the next turn's history: the answer, with the trace only if asked."""
        answer = "".join(self.content)
        if keep_thinking and self.reasoning:
            return THINK_OPEN + "".join(self.reasoning) + THINK_CLOSE + answer
        return answer


class PrefillProgress:
    """``prefill: DONE/TOTAL tokens`` on ``stream``, redrawn in place, once a prompt's
    evaluation has run for :data:`PROGRESS_DELAY` seconds; nothing unless ``stream`` is a
    terminal.

    Args:
        stream: where to draw (stderr).
        clock: seconds, monotonic (a test gives its own).
    """

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.enabled = _isatty(stream)
        self._start: Optional[float] = None
        self._done, self._total = 0, 0
        self._drawn = ""
        self.shown = False

    def update(self, done: int, total: int) -> None:
        """An evaluation of ``total`` tokens has ``done`` of them (``Llama.eval_progress``)."""
        if not self.enabled or total <= 1:
            return
        if done == 0 or self._start is None:
            self._start = self.clock()
        self._done, self._total = done, total
        self.tick()

    def tick(self) -> None:
        """Draw if the evaluation has run long enough (called while waiting, too)."""
        if self._start is None or self._done >= self._total and not self.shown:
            return
        if self.clock() - self._start < PROGRESS_DELAY:
            return
        line = f"prefill: {self._done}/{self._total} tokens ({100 * self._done // max(1, self._total)}%)"
        if line != self._drawn:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self._drawn = line
        self.shown = True

    def clear(self) -> None:
        """Remove the progress line (the reply starts, or stopped)."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.shown = False
        self._drawn = ""
        self._start = None


# ---------------------------------------------------------------------------------------------
# input


def history_path() -> Path:
    """The readline history file of ``sambay chat``."""
    from .cache import cache_root

    return cache_root() / HISTORY_FILE


def _open_history(readline: Any, path: Path) -> bool:
    """Read the history file, creating it (and its folder) readable by its owner only.
    Returns whether it can be used; a path that is not a plain file is left alone."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # no symlink followed, no wait on a FIFO someone put there
        flags = os.O_CREAT | os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        os.close(os.open(path, flags, 0o600))
        if not path.is_file():
            raise OSError(f"{path} is not a regular file")
        readline.read_history_file(str(path))
    except OSError as err:
        _log.warning("sambay chat: no input history: %s", err)
        return False
    return True


class LineReader:
    """Reads one message at a time, joining continued lines.

    Args:
        interactive: prompts and (when ``use_readline``) line editing and history; otherwise
            the lines of ``stream``, without prompts.
        stream: the piped input.
        input_fn: reads one line on a terminal (``input``; a test gives its own).
        use_readline: load ``readline`` when interactive (plain ``input()`` without it, or
            where the platform has none).
        history: the readline history file (None: none).
    """

    def __init__(self, *, interactive: bool, stream: TextIO = sys.stdin,
                 input_fn: Callable[[str], str] = input, use_readline: bool = True,
                 history: Optional[Path] = None) -> None:
        self.interactive = interactive
        self.stream = stream
        self.input_fn = input_fn
        self.discarded = False  # the last Ctrl-C threw away continued lines
        self._readline: Any = None
        self._history: Optional[Path] = None
        if interactive and use_readline:
            try:
                import readline
            except ImportError:  # e.g. Windows without pyreadline: input() still works
                pass
            else:
                self._readline = readline
                readline.set_history_length(HISTORY_LENGTH)
                if history is not None and _open_history(readline, history):
                    self._history = history

    def _line(self, prompt: str) -> str:
        if self.interactive:
            return self.input_fn(prompt)
        line = self.stream.readline()
        if line == "":
            raise EOFError
        return line[:-1] if line.endswith("\n") else line

    def read(self) -> str:
        """The next message (continued lines joined with newlines).

        Raises:
            EOFError: the input ended with nothing pending.
            KeyboardInterrupt: Ctrl-C; :attr:`discarded` says whether it threw away
                continued lines.
        """
        self.discarded = False
        lines: list[str] = []
        in_block = False
        while True:
            try:
                line = self._line(CONTINUATION if lines or in_block else PROMPT)
            except EOFError:
                if lines:
                    return "\n".join(lines)
                raise
            except KeyboardInterrupt:
                self.discarded = bool(lines) or in_block
                raise
            if in_block:
                if line.rstrip().endswith(BLOCK_QUOTE):
                    lines.append(line.rstrip()[: -len(BLOCK_QUOTE)])
                    return "\n".join(lines)
                lines.append(line)
            elif not lines and line.lstrip().startswith(BLOCK_QUOTE):
                rest = line.lstrip()[len(BLOCK_QUOTE):]
                if rest.rstrip().endswith(BLOCK_QUOTE):  # """one line"""
                    return rest.rstrip()[: -len(BLOCK_QUOTE)]
                in_block = True
                if rest:
                    lines.append(rest)
            elif line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                return "\n".join(lines)

    def close(self) -> None:
        """Write the readline history file."""
        if self._readline is not None and self._history is not None:
            try:
                self._readline.write_history_file(str(self._history))
            except OSError as err:
                _log.warning("sambay chat: input history not saved: %s", err)


# ---------------------------------------------------------------------------------------------
# the conversation


def reply_room(n_ctx: int, max_tokens: Optional[int]) -> int:
    """Tokens a prompt leaves free for the reply when the conversation is fitted into
    ``n_ctx``: ``max_tokens`` (``-n``), at most half the context; a quarter of it when the
    reply is unbounded."""
    if max_tokens is None or max_tokens <= 0:
        return n_ctx // 4
    return min(max_tokens, n_ctx // 2)


class MessageTooLong(ValueError):
    """One message (with the system message and the chat template) does not fit the context."""


class ChatSession:
    """A conversation with ``llm`` in a terminal.

    Args:
        llm: a :class:`sambay.Llama` whose GGUF has a chat template.
        system: the system message (kept when old turns are dropped and on ``/clear``).
        show_thinking: write the ``<think>`` trace (dimmed on a terminal).
        keep_thinking: keep each trace in the next turns' prompt.
        max_tokens: the reply's token limit (``-n``; <= 0: until the context is full).
        completion_kwargs: more keywords for ``create_chat_completion`` (sampling, budget,
            constraints, ``logits_processor``).
        out, err: replies go to ``out``, everything else to ``err``.
        after_reply: called after each reply (the speed report of ``--verbose-speed``).
        clock: seconds, monotonic (for the prefill progress).
    """

    def __init__(self, llm: Any, *, system: Optional[str] = None, show_thinking: bool = True,
                 keep_thinking: bool = False, max_tokens: Optional[int] = 512,
                 completion_kwargs: Optional[dict[str, Any]] = None, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, after_reply: Optional[Callable[[], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.llm = llm
        self.system = system
        self.show_thinking = show_thinking
        self.keep_thinking = keep_thinking
        self.max_tokens = max_tokens
        self.completion_kwargs = dict(completion_kwargs or {})
        self.out, self.err = out, err
        self.after_reply = after_reply
        self.clock = clock
        self.messages: list[dict[str, Any]] = []
        self.start = 0  # messages[start:] (after the system message) are what the prompt holds
        self.dropped_said = False
        self.clear()

    # ------------------------------------------------------------------ conversation

    def clear(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.start = 0

    def _split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        head = 1 if self.messages and self.messages[0].get("role") == "system" else 0
        return self.messages[:head], self.messages[head:]

    def _prompt_len(self, messages: list[dict[str, Any]]) -> int:
        return len(self.llm.chat_prompt(messages)[1])

    def fitted(self) -> list[dict[str, Any]]:
        """The messages the next prompt holds: the system message and the newest turns that
        fit the context with :func:`reply_room` left for the reply. When turns must go, so
        many go that the prompt takes at most three quarters of what is left, so that the
        next turns extend the same prompt (and reuse its evaluation) for a while.

        Raises:
            MessageTooLong: the last message does not fit even alone.
        """
        head, body = self._split()
        n_ctx = self.llm.n_ctx()
        budget = n_ctx - reply_room(n_ctx, self.max_tokens)
        start = min(self.start, len(body) - 1)
        if self._prompt_len(head + body[start:]) <= budget:
            return head + body[start:]
        # cut only where a user message starts a turn; the newest message is always one
        cuts = [i for i in range(start + 1, len(body)) if body[i].get("role") == "user"]
        if not cuts or cuts[-1] != len(body) - 1:
            cuts.append(len(body) - 1)

        def first_fit(limit: int) -> Optional[int]:
            lo, hi = 0, len(cuts)  # prompt length falls as the cut moves on: bisect
            while lo < hi:
                mid = (lo + hi) // 2
                if self._prompt_len(head + body[cuts[mid]:]) <= limit:
                    hi = mid
                else:
                    lo = mid + 1
            return cuts[lo] if lo < len(cuts) else None

        cut = first_fit(budget * 3 // 4)
        if cut is None:
            cut = first_fit(budget)
        if cut is None:
            n = self._prompt_len(head + body[-1:])
            if n >= n_ctx:
                raise MessageTooLong(
                    f"this message needs {n} tokens with the chat template"
                    f"{' and the system message' if head else ''}, and the context holds {n_ctx} "
                    "(-c sets it): it was not sent")
            cut = len(body) - 1  # it fits, with less room for the reply than asked
        if cut == start:
            return head + body[start:]  # nothing to drop: the reply gets what room there is
        if not self.dropped_said:
            self._say(f"the conversation no longer fits the context ({n_ctx} tokens): its oldest turns "
                      "are dropped from now on (the system message stays; -c sets a larger context)")
            self.dropped_said = True
        self.start = cut
        return head + body[cut:]

    # ------------------------------------------------------------------ commands

    def _say(self, text: str) -> None:
        self.err.write(f"sambay chat: {text}\n")
        self.err.flush()

    def command(self, text: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            self.err.write(HELP + "\n")
        elif name in ("/clear", "/reset"):
            self.clear()
            self._say("conversation cleared")
        elif name in ("/save", "/load") and not arg:
            self._say(f"{name} needs a file name: {name} FILE")
        elif name == "/save":
            try:
                with open(arg, "w", encoding="utf-8") as f:
                    json.dump(self.messages, f, ensure_ascii=False, indent=1)
                    f.write("\n")
            except OSError as err:
                self._say(f"cannot save to {arg}: {err.strerror or err}")
            else:
                self._say(f"saved {len(self.messages)} messages to {arg}")
        elif name == "/load":
            try:
                self.load(arg)
            except (OSError, ValueError) as err:
                self._say(f"cannot load {arg}: {getattr(err, 'strerror', None) or err}")
            else:
                self._say(f"loaded {len(self.messages)} messages from {arg}")
        else:
            self._say(f"unknown command {name} (/help lists the commands)")
        return True

    def load(self, path: str) -> None:
        """Replace the conversation with the one in ``path`` (JSON: a list of messages or
        ``{"messages": [...]}``); the current system message stays in front when the file
        has none.

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not such JSON (the conversation is left as it was).
        """
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"not JSON: {err}") from None
        if isinstance(data, dict):
            data = data.get("messages")
        if not isinstance(data, list):
            raise ValueError('expected a list of messages or {"messages": [...]}')
        messages = validate_messages(data)
        if self.system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        self.messages = messages
        self.start = 0

    # ------------------------------------------------------------------ a turn

    def ask(self, text: str) -> None:
        """Send a user message and write the reply (Ctrl-C stops it)."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.fitted()
        except ValueError as err:  # MessageTooLong, or a chat template that fails
            self.messages.pop()
            self._say(str(err))
            return
        printer = ReplyPrinter(self.out, show_thinking=self.show_thinking)
        finish, stopped, error = self._stream(prompt, printer)
        if not (error is not None or stopped) or printer.content or printer.reasoning and self.show_thinking:
            printer.finish()  # (an empty reply is an empty line: piped output has a line per reply)
        if error is not None:
            self.messages.pop()
            self._say(f"error: {error}")
            return
        answer = printer.history_text(self.keep_thinking)
        if stopped:
            if printer.content:
                self._say("[stopped; the answer so far stays in the conversation]")
            else:
                self._say("[stopped; this turn is dropped]")
                self.messages.pop()
                return
        elif finish == "length":
            full = self.llm.n_tokens >= self.llm.n_ctx() - 1
            self._say("[the reply was cut: " + ("the context is full]" if full else
                                                 f"it reached -n {self.max_tokens} tokens]"))
        self.messages.append({"role": "assistant", "content": answer})
        if self.after_reply is not None:
            self.after_reply()

    def _stream(self, prompt: list[dict[str, Any]],
                printer: ReplyPrinter) -> tuple[Optional[str], bool, Optional[BaseException]]:
        """Generate in a worker thread, writing its deltas here; Ctrl-C cancels it.
        Returns (finish_reason, stopped, error)."""
        events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        llm = self.llm
        kwargs = dict(self.completion_kwargs, stream=True, max_tokens=self.max_tokens)

        def work() -> None:
            try:
                for chunk in llm.create_chat_completion(prompt, **kwargs):
                    choice = chunk["choices"][0]
                    events.put(("delta", choice["delta"], choice["finish_reason"]))
            except AbortedError:
                events.put(("end", "stopped"))
            except BaseException as err:  # noqa: BLE001  (handed to the waiting thread)
                events.put(("end", err))
            else:
                events.put(("end", None))

        progress = PrefillProgress(self.err, clock=self.clock)
        def on_eval(done: int, total: int) -> None:
            if total > 1:  # a prompt, not a decode step
                events.put(("progress", done, total))

        llm.eval_progress = on_eval
        worker = threading.Thread(target=work, name="sambay-chat-reply", daemon=True)
        finish: Optional[str] = None
        stopped = False
        outcome: Any = None
        try:
            try:
                worker.start()  # waits for the thread to run, which may already reach a Ctrl-C
            except KeyboardInterrupt:
                stopped = True
                if worker.ident is None:  # it never ran: nothing to cancel or wait for
                    return finish, True, None
                llm.cancel()
            while True:
                try:
                    while True:
                        try:
                            event = events.get(timeout=_TICK)
                        except queue.Empty:
                            progress.tick()
                            continue
                        if event[0] == "progress":
                            progress.update(event[1], event[2])
                        elif event[0] == "delta":
                            progress.clear()
                            if not stopped:
                                printer.write(event[1])
                                finish = event[2] or finish
                        else:
                            outcome = event[1]
                            break
                    break
                except KeyboardInterrupt:
                    stopped = True
                    llm.cancel()  # the worker ends with AbortedError (or finishes first)
        finally:
            progress.clear()
            llm.eval_progress = None
        worker.join()
        if outcome == "stopped":
            return finish, True, None
        if isinstance(outcome, (ValueError, ComputeError, StateError)):
            return finish, stopped, outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return finish, stopped, None

    # ------------------------------------------------------------------ the loop

    def run(self, reader: LineReader) -> int:
        """Read and answer messages until ``/bye``, the end of input or two Ctrl-C in a row.
        Returns the exit status (0)."""
        if reader.interactive:
            self._say("/help for commands; Ctrl-D or /bye to quit")
        interrupts = 0
        try:
            while True:
                try:
                    text = reader.read()
                except EOFError:
                    if reader.interactive:
                        self.err.write("\n")
                    break
                except KeyboardInterrupt:
                    self.err.write("\n")
                    if reader.discarded:
                        interrupts = 0
                        continue
                    interrupts += 1
                    if interrupts >= 2:
                        break
                    self._say("Ctrl-C again, Ctrl-D or /bye to quit")
                    continue
                if not text.strip():
                    continue  # (not an action: Ctrl-C, Enter, Ctrl-C quits)
                interrupts = 0
                if text.lstrip().startswith("/"):
                    try:
                        if not self.command(text):
                            break
                    except KeyboardInterrupt:
                        self.err.write("\n")
                    continue
                try:
                    self.ask(text)
                except KeyboardInterrupt:  # between the reply's parts (fitting, printing)
                    self._say("[stopped]")
                    if self.messages and self.messages[-1] == {"role": "user", "content": text}:
                        self.messages.pop()
        finally:
            reader.close()
        return 0


def run_chat(llm: Any, **session_kwargs: Any) -> int:
    """``sambay chat``: a :class:`ChatSession` over stdin (a terminal: line editing, history in
    :func:`history_path`; piped: one message per line). Returns the exit status."""
    interactive = _isatty(sys.stdin)
    reader = LineReader(interactive=interactive, history=history_path() if interactive else None)
    return ChatSession(llm, **session_kwargs).run(reader)


__all__ = ["ChatSession", "LineReader", "MessageTooLong", "PrefillProgress", "ReplyPrinter",
           "history_path", "reply_room", "run_chat"]
