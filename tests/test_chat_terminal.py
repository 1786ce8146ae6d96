"""``sambay chat`` in a terminal (sambay.terminal): input, slash commands, Ctrl-C, the prefill
progress and a conversation longer than the context. Most tests drive a ChatSession in this
process with scripted input on the built-in demo model; two run the CLI under a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import sys
import threading
import time

import numpy as np
import pytest

from sambay import Llama, demo_model_path
from sambay.terminal import ChatSession, LineReader, PrefillProgress, reply_room

WAIT = 30  # seconds a test waits for something that should happen at once (a bound, not a timing)


class TTYBuffer(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def piped(*lines: str) -> LineReader:
    return LineReader(interactive=False, stream=io.StringIO("".join(f"{line}\n" for line in lines)))


def scripted(*items: object) -> tuple[LineReader, list[str]]:
    """An interactive reader (no readline) whose input() returns ``items`` in turn (an
    exception class is raised instead), then EOF; also the prompts it was given."""
    prompts: list[str] = []
    queue = list(items)

    def fake_input(prompt: str) -> str:
        prompts.append(prompt)
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return str(item)

    return LineReader(interactive=True, input_fn=fake_input, use_readline=False), prompts


@pytest.fixture(scope="module")
def llm():
    with Llama(demo_model_path(), n_ctx=512, verbose=False) as model:
        yield model


def session(llm, **kw) -> tuple[ChatSession, io.StringIO, io.StringIO]:
    out, err = kw.pop("out", io.StringIO()), kw.pop("err", io.StringIO())
    kw.setdefault("max_tokens", 48)
    kw.setdefault("completion_kwargs", {"temperature": 0})
    return ChatSession(llm, out=out, err=err, **kw), out, err


def api_answer(llm, messages, max_tokens=48) -> str:
    out = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)
    return out["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------
# input


def test_continued_lines_and_blocks_are_one_message():
    reader, prompts = scripted("first \\", "second", '"""a', "b", 'c"""', '"""one line"""', "  last  ")
    assert reader.read() == "first \nsecond"
    assert reader.read() == "a\nb\nc"
    assert reader.read() == "one line"
    assert reader.read() == "  last  "
    with pytest.raises(EOFError):
        reader.read()
    assert prompts == [">>> ", "... ", ">>> ", "... ", "... ", ">>> ", ">>> ", ">>> "]
    # piped input: the same rules, and what is pending at the end of the input is sent
    reader = piped("x \\", "y", "z \\")
    assert reader.read() == "x \ny"
    assert reader.read() == "z "
    with pytest.raises(EOFError):
        reader.read()


def test_ctrl_c_while_continuing_discards_the_lines():
    reader, _ = scripted("a \\", KeyboardInterrupt, "b")
    with pytest.raises(KeyboardInterrupt):
        reader.read()
    assert reader.discarded
    assert reader.read() == "b"
    reader, _ = scripted(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        reader.read()
    assert not reader.discarded


def test_without_readline_input_still_works(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "readline", None)  # import readline raises ImportError
    lines = iter(["hello"])
    reader = LineReader(interactive=True, input_fn=lambda prompt: next(lines), history=tmp_path / "h")
    assert reader.read() == "hello"
    reader.close()
    assert not (tmp_path / "h").exists()


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW") or sys.platform == "win32", reason="POSIX symlinks")
def test_a_history_path_that_is_a_symlink_is_left_alone(tmp_path, caplog):
    pytest.importorskip("readline")
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    link = tmp_path / "home" / "chat-history"
    link.parent.mkdir()
    link.symlink_to(target)
    reader = LineReader(interactive=True, input_fn=lambda prompt: "x", history=link)
    reader.close()
    assert target.read_text() == "untouched\n"
    assert "no input history" in caplog.text
    # a new file is made readable by its owner only, in a folder only they can enter
    fresh = tmp_path / "new" / "chat-history"
    LineReader(interactive=True, input_fn=lambda prompt: "x", history=fresh).close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700


# ---------------------------------------------------------------------------------------------
# slash commands, EOF


def test_slash_commands_save_load_clear_and_eof(llm, tmp_path):
    saved = tmp_path / "conv.json"
    s, out, err = session(llm, system="You compute.")
    status = s.run(piped("What is 12 + 34?", f"/save {saved}", "/clear", "/help", "/frobnicate",
                         "/load", f"/load {tmp_path / 'missing.json'}", f"/load {saved}", "What is 5 + 6?"))
    assert status == 0  # the end of the input ends the session
    system = {"role": "system", "content": "You compute."}
    first = [system, {"role": "user", "content": "What is 12 + 34?"}]
    r1 = api_answer(llm, first)
    # the file holds the conversation with the answer only (the trace stays out)
    assert json.loads(saved.read_text()) == first + [{"role": "assistant", "content": r1}]
    assert "<think>" not in saved.read_text() and r1
    # after /load, the second question is answered with the loaded history
    second = first + [{"role": "assistant", "content": r1}, {"role": "user", "content": "What is 5 + 6?"}]
    r2 = api_answer(llm, second)
    assert s.messages == second + [{"role": "assistant", "content": r2}]
    assert out.getvalue().count(r2) >= 1 and out.getvalue().rstrip().endswith(r2)
    text = err.getvalue()
    assert "saved 3 messages" in text and "conversation cleared" in text and "/save FILE" in text
    assert "unknown command /frobnicate" in text and "/load needs a file name" in text
    assert "cannot load" in text and "missing.json" in text and "loaded 3 messages" in text


def test_clear_forgets_and_bye_quits(llm):
    s, out, err = session(llm)
    assert s.run(piped("What is 1 + 1?", "/clear", "/bye", "What is 2 + 2?")) == 0
    assert s.messages == []  # and nothing after /bye was read
    assert "conversation cleared" in err.getvalue()


def test_bad_conversation_file_is_refused_and_the_conversation_kept(llm, tmp_path):
    bad = tmp_path / "bad.json"
    for content in ("not json", '{"messages": 3}', '[{"content": "no role"}]'):
        bad.write_text(content)
        s, _, err = session(llm, system="sys")
        s.command(f"/load {bad}")
        assert s.messages == [{"role": "system", "content": "sys"}]
        assert "cannot load" in err.getvalue()


# ---------------------------------------------------------------------------------------------
# Ctrl-C


class CancelWatch(Llama):
    """A Llama that says when cancel() was called, and calls ``hook(done, total)`` (if set)
    after whatever ``eval_progress`` the session installs."""

    hook = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        super().cancel()

    @property
    def eval_progress(self):
        inner, hook = self._inner_progress, self.hook
        if hook is None:
            return inner

        def both(done, total):
            if inner is not None:
                inner(done, total)
            hook(done, total)

        return both

    @eval_progress.setter
    def eval_progress(self, fn):
        self._inner_progress = fn


@pytest.fixture(scope="module")
def watched():
    # no snapshots: each test's prompt is evaluated from its start after reset()
    with CancelWatch(demo_model_path(), n_ctx=512, n_batch=8, max_snapshots=0, verbose=False) as model:
        yield model


def forcing(tokens: list[int], then: int, *, interrupt_after: int, shown: io.StringIO, shown_len: int,
            llm: CancelWatch):
    """A logits processor that makes the model write ``tokens`` then ``then`` forever, and at
    token ``interrupt_after`` waits until ``shown`` holds ``shown_len`` characters, sends this
    process SIGINT (as Ctrl-C does) and waits for the session to cancel."""
    step = 0

    def processor(input_ids, scores):
        nonlocal step
        if step == interrupt_after:
            deadline = time.monotonic() + WAIT
            while len(shown.getvalue()) < shown_len and time.monotonic() < deadline:
                time.sleep(0.01)
            signal.raise_signal(signal.SIGINT)
            llm.cancelled.wait(WAIT)
        forced = np.full_like(scores, -np.inf)
        forced[tokens[step] if step < len(tokens) else then] = 0
        step += 1
        return forced

    return processor


def test_ctrl_c_stops_the_reply_and_keeps_the_answer_so_far(watched):
    seven = watched.tokenize("7")
    assert len(seven) == 1
    out = io.StringIO()
    watched.cancelled.clear()
    proc = forcing([], seven[0], interrupt_after=5, shown=out, shown_len=5, llm=watched)
    s, out, err = session(watched, out=out, max_tokens=200,
                          completion_kwargs={"temperature": 0, "logits_processor": proc})
    assert s.run(piped("What is 1 + 2?", "What is 3 + 4?")) == 0
    assert watched.cancelled.is_set()
    assert "[stopped; the answer so far stays" in err.getvalue()
    assert s.messages[:2] == [{"role": "user", "content": "What is 1 + 2?"},
                              {"role": "assistant", "content": "77777"}]
    # the next message is answered (the processor goes on forcing 7s: 200 of them, length)
    assert s.messages[2:] == [{"role": "user", "content": "What is 3 + 4?"},
                              {"role": "assistant", "content": "7" * 200}]
    assert out.getvalue() == "77777\n" + "7" * 200 + "\n"
    assert "Traceback" not in err.getvalue()


def test_ctrl_c_while_thinking_drops_the_turn(watched):
    think = watched.tokenize("<think>", special=True)
    seven = watched.tokenize("7")[0]
    out = TTYBuffer()
    watched.cancelled.clear()
    # the trace is shown dimmed on a terminal; interrupt after three 7s of the trace
    dim = "\x1b[2m"
    proc = forcing(think, seven, interrupt_after=len(think) + 3, shown=out, shown_len=len(dim) + 3,
                   llm=watched)
    s, out, err = session(watched, out=out, max_tokens=200,
                          completion_kwargs={"temperature": 0, "logits_processor": proc})
    assert s.run(piped("What is 1 + 2?")) == 0
    assert watched.cancelled.is_set() and "[stopped; this turn is dropped]" in err.getvalue()
    assert s.messages == []
    assert out.getvalue() == dim + "777" + "\x1b[0m\n\n"


def test_ctrl_c_during_the_prefill_cancels_it(watched):
    """The engine stops between two micro-batches of the prompt; the turn is dropped and the
    Llama answers the next message."""
    watched.cancelled.clear()
    watched.reset()
    calls = []

    def hook(done, total):  # Ctrl-C once two micro-batches of the first prompt are done
        calls.append((done, total))
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
            watched.cancelled.wait(WAIT)

    question = "What is " + " + ".join(str(i) for i in range(10, 30)) + "?"
    s, _, err = session(watched, max_tokens=16)
    watched.hook = hook
    try:
        assert s.run(piped(question, "What is 2 + 2?")) == 0
    finally:
        watched.hook = None
    assert watched.cancelled.is_set() and "[stopped; this turn is dropped]" in err.getvalue()
    total = calls[0][1]
    assert calls[:3] == [(0, total), (8, total), (16, total)] and total > 24
    assert (24, total) not in calls  # nothing after the cancel
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["What is 2 + 2?"]
    assert s.messages[-1]["content"] == api_answer(watched, s.messages[:1], max_tokens=16)


def test_ctrl_c_while_the_reply_thread_starts_cancels_it(watched, monkeypatch):
    """A Ctrl-C that reaches the session while it is still starting the reply's thread (a small
    model can be at its first micro-batch by then) cancels that reply as one a moment later
    does: the turn is dropped and the next message is answered (it used to escape with the
    thread still running, and the next message found the Llama busy)."""
    import sambay.terminal as terminal

    starts = []

    class SlowStart(threading.Thread):
        def start(self):  # the session is still inside the first start() when the Ctrl-C comes
            starts.append(self)
            super().start()
            if len(starts) == 1:
                time.sleep(WAIT)  # (a signal ends it)

    watched.cancelled.clear()
    watched.reset()
    fired = []

    def hook(done, total):
        if not fired:
            fired.append(done)
            # to the main thread, as a terminal's Ctrl-C reaches it: it wakes the sleep above
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            watched.cancelled.wait(WAIT)

    monkeypatch.setattr(terminal.threading, "Thread", SlowStart)
    s, _, err = session(watched, max_tokens=16)
    watched.hook = hook
    try:
        assert s.run(piped("What is 1 + 2?", "What is 2 + 2?")) == 0
    finally:
        watched.hook = None
    assert len(starts) == 2 and fired == [0]
    assert watched.cancelled.is_set() and "[stopped; this turn is dropped]" in err.getvalue()
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["What is 2 + 2?"]
    assert s.messages[-1]["content"] == api_answer(watched, s.messages[:1], max_tokens=16)


def test_ctrl_c_at_the_prompt_says_how_to_quit_and_twice_quits(llm):
    reader, _ = scripted(KeyboardInterrupt, "What is 1 + 1?", KeyboardInterrupt, "/help",
                         KeyboardInterrupt, KeyboardInterrupt, "not read")
    s, out, err = session(llm)
    assert s.run(reader) == 0
    assert err.getvalue().count("Ctrl-C again, Ctrl-D or /bye to quit") == 3
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    # Ctrl-C while continuing a line throws the line away and does not count
    reader, _ = scripted("a \\", KeyboardInterrupt, KeyboardInterrupt, "b \\", KeyboardInterrupt, "/bye")
    s, _, err = session(llm)
    assert s.run(reader) == 0 and err.getvalue().count("Ctrl-C again") == 1 and s.messages == []


# ---------------------------------------------------------------------------------------------
# a conversation longer than the context


def test_old_turns_are_dropped_and_said_once():
    with Llama(demo_model_path(), n_ctx=160, verbose=False) as small:
        questions = [f"What is {a} + {b}?" for a, b in [(12, 34), (56, 78), (90, 12), (34, 56), (78, 90),
                                                         (11, 22), (33, 44)]]
        s, out, err = session(small, system="Add.", max_tokens=60)
        fitted = []
        real = s.fitted

        def spy():
            got = real()
            fitted.append(got)
            return got

        s.fitted = spy
        assert s.run(piped(*questions)) == 0
        text = err.getvalue()
        assert text.count("no longer fits the context (160 tokens)") == 1 and "error" not in text
        # every question was answered, and every prompt fitted with room for the reply
        assert [m["content"] for m in s.messages if m["role"] == "user"] == questions
        assert len(s.messages) == 1 + 2 * len(questions)
        room = reply_room(160, 60)
        assert all(len(small.chat_prompt(p)[1]) + room <= 160 for p in fitted)
        assert all(p[0] == {"role": "system", "content": "Add."} for p in fitted)
        assert all(p[1]["role"] == "user" for p in fitted)
        assert len(fitted[-1]) < len(s.messages) - 1  # turns went
        # the last answer is the model's answer to what was kept
        assert s.messages[-1]["content"] == api_answer(small, fitted[-1], max_tokens=60)


def test_a_message_that_cannot_fit_is_refused():
    with Llama(demo_model_path(), n_ctx=64, verbose=False) as small:
        s, out, err = session(small, max_tokens=48)  # room for the reply: 32
        long = "What is " + " + ".join(["12345"] * 40) + "?"
        tight = "What is " + " + ".join(["12"] * 10) + "?"  # 46 tokens: fits, with 18 for the reply
        assert 32 < len(small.chat_prompt([{"role": "user", "content": tight}])[1]) < 64
        assert s.run(piped(long, tight)) == 0
        assert "tokens with the chat template, and the context holds 64 (-c sets it): it was not sent" \
            in err.getvalue()
        assert [m["content"] for m in s.messages if m["role"] == "user"] == [tight]
        # nothing was dropped, so nothing is said about it; the reply ran into the context's end
        assert "no longer fits" not in err.getvalue()
        assert "[the reply was cut: the context is full]" in err.getvalue()


# ---------------------------------------------------------------------------------------------
# prefill progress


def test_progress_is_drawn_after_the_delay_on_a_terminal_only():
    now = [0.0]
    tty = TTYBuffer()
    p = PrefillProgress(tty, clock=lambda: now[0])
    p.update(0, 100)
    now[0] = 0.5
    p.update(40, 100)
    assert tty.getvalue() == ""
    now[0] = 1.2
    p.tick()
    p.tick()  # drawn again only when it changes
    assert tty.getvalue() == "\r\x1b[Kprefill: 40/100 tokens (40%)"
    p.update(100, 100)
    p.clear()
    assert tty.getvalue().endswith("prefill: 100/100 tokens (100%)\r\x1b[K")
    p.update(1, 1)  # a decode step: nothing
    piped_err = io.StringIO()
    q = PrefillProgress(piped_err, clock=lambda: now[0])
    q.update(0, 100)
    now[0] = 10.0
    q.update(50, 100)
    q.tick()
    assert piped_err.getvalue() == ""


def test_eval_progress_reports_each_micro_batch():
    with Llama(demo_model_path(), n_ctx=128, n_batch=8, verbose=False) as small:
        calls = []
        small.eval_progress = lambda done, total: calls.append((done, total))
        small.eval(list(range(3, 33)))
        assert calls == [(0, 30), (8, 30), (16, 30), (24, 30), (30, 30)]


def test_a_slow_prefill_shows_progress_on_a_terminal(watched):
    ticks = [0.0]

    def clock():  # each look at the clock is 0.3 s later: the prefill is "slow"
        ticks[0] += 0.3
        return ticks[0]

    question = "What is " + " + ".join(str(i) for i in range(10, 30)) + "?"
    shown = {}
    for name, err in (("tty", TTYBuffer()), ("pipe", io.StringIO())):
        watched.reset()  # the whole prompt is evaluated each time
        s, out, _ = session(watched, err=err, clock=clock, max_tokens=4)
        s.run(piped(question))
        shown[name] = err.getvalue()
    assert "\r\x1b[Kprefill: " in shown["tty"] and "tokens (" in shown["tty"]
    assert "prefill" not in shown["pipe"]


# ---------------------------------------------------------------------------------------------
# under a pseudo-terminal


pty = pytest.importorskip("pty") if sys.platform != "win32" else None


class Terminal:
    """A child process on a pseudo-terminal; ``expect`` reads until a text appears."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import subprocess

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True,
                                     preexec_fn=self._controlling_tty)
        os.close(slave)
        self.seen = ""

    @staticmethod
    def _controlling_tty() -> None:
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def expect(self, text: str, start: int = 0) -> int:
        """Read until ``text`` appears after offset ``start``; returns the offset after it."""
        import select

        deadline = time.monotonic() + WAIT
        while text not in self.seen[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not seen; output so far:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"{text!r} not seen before the end; output:\n{self.seen}")
                self.seen += data.decode("utf-8", "replace")
        return self.seen.index(text, start) + len(text)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def ctrl_c_at_prompt(self) -> None:
        """Ctrl-C at the prompt. CPython's readline waits in select() without a timeout, so a
        SIGINT that lands between drawing the prompt and that select() is only seen at the
        next key: if nothing happens, an Enter (an empty line, which the chat ignores) is it."""
        import select

        before = len(self.seen)
        self.send("\x03")
        ready, _, _ = select.select([self.master], [], [], 2.0)
        if not ready and len(self.seen) == before:
            self.send("\r")

    def wait(self) -> int:
        rc = self.proc.wait(WAIT)
        os.close(self.master)
        return rc


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, SAMBAY_HOME=str(tmp_path / "home"), TERM="dumb")
    return e


def test_cli_under_a_terminal_keeps_history_and_quits_on_two_ctrl_c(env, tmp_path):
    t = Terminal([sys.executable, "-m", "sambay", "chat", "--temp", "0", "-n", "200"], env)
    pos = t.expect(">>> ")
    t.send("What is 347 + 582?\r")
    pos = t.expect("The answer is 929.", pos)
    pos = t.expect(">>> ", pos)
    t.ctrl_c_at_prompt()
    pos = t.expect("Ctrl-C again, Ctrl-D or /bye to quit", pos)
    t.expect(">>> ", pos)
    t.ctrl_c_at_prompt()
    assert t.wait() == 0
    assert "Traceback" not in t.seen
    history = tmp_path / "home" / "chat-history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "What is 347 + 582?" in history.read_text()


DRIVER = r"""
import sys, time
import numpy as np
from sambay import Llama, demo_model_path
from sambay.terminal import ChatSession, LineReader
llm = Llama(demo_model_path(), n_ctx=32768, verbose=False)
seven = llm.tokenize("7")[0]
def only_sevens(ids, scores):
    time.sleep(0.005)  # an endless reply: 32K tokens take minutes, far longer than WAIT
    forced = np.full_like(scores, -np.inf)
    forced[seven] = 0
    return forced
s = ChatSession(llm, max_tokens=-1, completion_kwargs={"logits_processor": only_sevens})
sys.exit(s.run(LineReader(interactive=True, use_readline=False)))
"""


def test_ctrl_c_in_a_terminal_stops_a_reply(env):
    t = Terminal([sys.executable, "-c", DRIVER], env)
    pos = t.expect(">>> ")
    t.send("What is 1 + 2?\r")
    pos = t.expect("777", pos)
    t.send("\x03")
    pos = t.expect("[stopped; the answer so far stays in the conversation]", pos)
    pos = t.expect(">>> ", pos)
    t.send("/bye\r")
    assert t.wait() == 0
    assert "Traceback" not in t.seen and "KeyboardInterrupt" not in t.seen
