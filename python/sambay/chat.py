"""Chat templates: the GGUF's ``tokenizer.chat_template`` rendered the way transformers does.

Rendering runs in Jinja's ``ImmutableSandboxedEnvironment`` (``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that keeps non-ASCII text, and
``raise_exception`` / ``strftime_now`` globals), so a hostile template cannot reach Python
internals. A template found on the internet cannot run away either:

- output size: at most ``MAX_RENDERED_CHARS`` characters;
- loops: all ``range()`` iterations of one render together at most ``MAX_RANGE_STEPS``;
- time: a render that runs longer than ``max_seconds`` (default ``MAX_RENDER_SECONDS``) is
  stopped between two Python steps (a trace function; this catches endless macro recursion
  with fan-out and anything else that only burns time);
- size of single operations: ``*``, ``**``, ``%``, ``+`` and ``~`` (string/list repetition,
  huge powers, ``'%0999999999d'`` formatting, doubling concatenation), the width arguments of the
  ``center``/``indent``/``wordwrap`` filters, ``replace`` and the ``str`` methods that pad
  (``center``, ``ljust``, ``rjust``, ``zfill``, ``expandtabs``) are checked before they run
  against ``MAX_RENDERED_CHARS``; ``lipsum`` is not available.

Every failure is a :class:`ChatTemplateError` that says what happened.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence

MAX_RENDERED_CHARS = 4_000_000
MAX_RANGE_STEPS = 1_000_000  # all range() iterations of one render together
MAX_RENDER_SECONDS = 5.0
MAX_POW_BITS = 4096  # largest integer ** may produce, in bits


class ChatTemplateError(ValueError):
    """The chat template is invalid, raised an error, or tried something unsafe."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(value: Any, indent: Optional[int] = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _too_big(what: str, n: int) -> ChatTemplateError:
    return ChatTemplateError(
        f"chat template operation too large: {what} would make {n} items "
        f"(limit {MAX_RENDERED_CHARS})"
    )


def _check_size(what: str, n: Any) -> None:
    if isinstance(n, int) and n > MAX_RENDERED_CHARS:
        raise _too_big(what, n)


_SIZED = (str, bytes, list, tuple)
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _safe_binop(op: str, left: Any, right: Any) -> Any:
    """``left op right`` after checking that the result cannot be absurdly large."""
    if op == "*":
        for seq, k in ((left, right), (right, left)):
            if isinstance(seq, _SIZED) and isinstance(k, int):
                _check_size("repetition", len(seq) * k)
        return left * right
    if op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_POW_BITS:
                raise ChatTemplateError(f"chat template operation too large: {left} ** {right}")
        return left ** right
    if op == "%":
        if isinstance(left, str):
            for width, prec in _FORMAT_WIDTH.findall(left):
                for v in (width, prec):
                    if v == "*":
                        raise ChatTemplateError("chat template: '*' widths in % formatting are not allowed")
                    if v and int(v) > MAX_RENDERED_CHARS:
                        raise _too_big("% formatting", int(v))
        return left % right
    if op == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED):
            _check_size("concatenation", len(left) + len(right))
        return left + right
    raise AssertionError(op)


_PADDING_METHODS = {"center", "ljust", "rjust", "zfill"}


def _make_environment() -> Any:
    from jinja2 import filters as jf
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from jinja2.compiler import CodeGenerator

    class CodeGen(CodeGenerator):
        # ``a ~ b`` compiles to str_join((a, b)) in plain Jinja: route it through a size check
        # (no autoescape here, so str_join's semantics are the ones to keep)
        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    def concat_with_size_check(values: Sequence[Any]) -> str:
        parts = [str(v) for v in values]
        _check_size("~ concatenation", sum(map(len, parts)))
        return "".join(parts)

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})
        code_generator_class = CodeGen
        checked_concat = staticmethod(concat_with_size_check)  # what CodeGen's ``~`` calls

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _safe_binop(operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            target = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            if isinstance(target, str):
                if name in _PADDING_METHODS and args:
                    _check_size(f"str.{name}", args[0])
                elif name == "expandtabs":
                    _check_size("str.expandtabs", len(target) * (args[0] if args else kwargs.get("tabsize", 8)))
                elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
                    _check_size("str.replace", (len(target) + 1) * max(1, len(args[1])))
                elif name == "join" and args and isinstance(args[0], _SIZED):
                    _check_size("str.join", len(target) * len(args[0]))
            return super().call(__context, __obj, *args, **kwargs)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def center(value: Any, width: int = 80) -> str:
        _check_size("center", width)
        return jf.do_center(value, width)

    def indent(s: str, width: Any = 4, first: bool = False, blank: bool = False) -> str:
        if isinstance(width, int):
            _check_size("indent", width * (str(s).count("\n") + 1))
        elif isinstance(width, str):
            _check_size("indent", len(width) * (str(s).count("\n") + 1))
        return jf.do_indent(s, width, first, blank)

    def wordwrap(eval_ctx: Any, s: str, width: int = 79, *args: Any, **kwargs: Any) -> str:
        _check_size("wordwrap", width)
        return jf.do_wordwrap(eval_ctx, s, width, *args, **kwargs)

    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Optional[int] = None) -> Any:
        _check_size("replace", (len(str(s)) + 1) * max(1, len(str(new))))
        return jf.do_replace(eval_ctx, s, old, new, count)

    from jinja2.utils import pass_eval_context

    env.filters["center"] = center
    env.filters["indent"] = indent
    env.filters["wordwrap"] = pass_eval_context(wordwrap)
    env.filters["replace"] = pass_eval_context(replace)
    env.globals.pop("lipsum", None)
    return env


class ChatFormatter:
    """Renders a list of chat messages to a prompt with one Jinja template.

    Args:
        template: the Jinja source (e.g. a GGUF's ``tokenizer.chat_template``).
        eos_token, bos_token: the texts the template sees as ``eos_token`` / ``bos_token``.
        max_seconds: a render that takes longer is stopped with :class:`ChatTemplateError`.

    Raises:
        ChatTemplateError: the template does not compile.
    """

    def __init__(self, template: str, *, eos_token: str = "", bos_token: str = "",
                 max_seconds: float = MAX_RENDER_SECONDS) -> None:
        import jinja2

        if not isinstance(template, str):
            raise ChatTemplateError(f"the chat template must be a string, got {type(template).__name__}")
        if len(template) > MAX_RENDERED_CHARS:
            raise ChatTemplateError(f"the chat template is too long ({len(template)} characters)")
        self.max_seconds = float(max_seconds)
        env = _make_environment()
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"invalid chat template: {err}") from err
        self.source = template
        self.eos_token = eos_token
        self.bos_token = bos_token

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Optional[Sequence[Any]] = None,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages``.

        Raises:
            ChatTemplateError: bad messages, a template error, unsafe access, or output too long.
        """
        import jinja2
        from jinja2.sandbox import SecurityError

        checked = validate_messages(messages)
        steps = 0

        def budgeted_range(*args: int) -> Any:
            nonlocal steps
            for i in range(*args):
                steps += 1
                if steps > MAX_RANGE_STEPS:
                    raise ChatTemplateError(
                        f"chat template ran more than {MAX_RANGE_STEPS} loop iterations"
                    )
                yield i

        extra.setdefault("range", budgeted_range)
        deadline = time.monotonic() + self.max_seconds
        max_seconds = self.max_seconds

        fired = False

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            nonlocal fired
            if fired:
                return None
            if time.monotonic() > deadline:
                fired = True  # once: Jinja's own error handling must run untraced
                sys.settrace(None)
                raise ChatTemplateError(f"chat template rendering took longer than {max_seconds:g} s")
            return tracer

        previous_trace = sys.gettrace()
        sys.settrace(tracer)
        try:
            pieces = []
            size = 0
            for piece in self._template.generate(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                eos_token=self.eos_token,
                bos_token=self.bos_token,
                **extra,
            ):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(
                        f"chat template output exceeds {MAX_RENDERED_CHARS} characters"
                    )
                pieces.append(piece)
        except SecurityError as err:
            raise ChatTemplateError(f"chat template tried unsafe access: {err}") from err
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template failed: {err}") from err
        except (OverflowError, RecursionError, TypeError, ValueError, KeyError, MemoryError,
                AttributeError, IndexError, ZeroDivisionError, LookupError) as err:
            if isinstance(err, ChatTemplateError):
                raise
            raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from err
        finally:
            sys.settrace(previous_trace)
        return "".join(pieces)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the OpenAI-style message list; returns plain dicts.

    Raises:
        ChatTemplateError: not a list of {"role": str, "content": str | None, ...} dicts.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}] needs a 'role' string")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                texts = [p.get("text", "") for p in content
                         if isinstance(p, Mapping) and p.get("type") == "text"]
                if len(texts) != len(content):
                    raise ChatTemplateError(f"messages[{i}]: only text content parts are supported")
                content = "".join(texts)
            else:
                raise ChatTemplateError(f"messages[{i}]['content'] must be a string")
        d = dict(m)
        d["content"] = content if content is not None else ""
        out.append(d)
    return out


# --- which template renders a conversation (issue 14) -----------------------------------------
# llama.cpp's built-in template names (``--chat-template NAME``) that sambay knows, each written
# out as Jinja with llama.cpp's meaning. ``phi3`` is the closest to Phi-4-mini's own format (which
# has no newlines); the GGUF's embedded template stays the default.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "phi4": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
}


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def choose_template(override: Optional[str], embedded: Optional[str]) -> Optional[str]:
    """The Jinja source that renders chats: ``override`` (a name of :data:`BUILTIN_TEMPLATES`,
    or Jinja text) when given, else the GGUF's ``tokenizer.chat_template`` (``embedded``);
    None when there is neither.

    Raises:
        ChatTemplateError: ``override`` is neither a known name nor Jinja text.
    """
    if override is None:
        return embedded or None
    if not isinstance(override, str):
        raise ChatTemplateError(f"chat_template must be a string (a name or Jinja text), "
                                f"got {type(override).__name__}")
    if override in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[override]
    if not _looks_like_jinja(override):
        raise ChatTemplateError(
            f"unknown chat template name {override!r}: the built-in names are "
            f"{', '.join(BUILTIN_TEMPLATES)}; anything else must be Jinja text (with {{{{ or {{%) "
            f"or come from a file (--chat-template-file)")
    return override


def check_template(override: str) -> None:
    """Checks a given template before anything loads: a known name, or Jinja text that compiles.

    Raises:
        ChatTemplateError: an unknown name, or a template that does not compile.
    """
    ChatFormatter(choose_template(override, None) or "")


def read_template_file(path: str) -> str:
    """The Jinja text of a ``--chat-template-file``, checked to compile.

    Raises:
        ChatTemplateError: the file cannot be read, is not UTF-8, has no Jinja tags, or does
            not compile; the message names the file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ChatTemplateError(f"chat template file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ChatTemplateError(f"chat template file {path}: {err.strerror or err}") from None
    if not _looks_like_jinja(text):
        raise ChatTemplateError(f"chat template file {path}: no Jinja tags ({{{{ or {{%): "
                                f"it would not show the messages")
    try:
        ChatFormatter(text)
    except ChatTemplateError as err:
        raise ChatTemplateError(f"chat template file {path}: {err}") from None
    return text
