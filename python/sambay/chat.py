"""Chat templates: the GGUF's ``tokenizer.chat_template`` rendered the way transformers does.

Rendering runs in Jinja's ``ImmutableSandboxedEnvironment`` (``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that keeps non-ASCII text, and
``raise_exception`` / ``strftime_now`` globals), so a hostile template cannot reach Python
internals; rendering is bounded in output size and in loop iterations (``range`` is budgeted),
so a template cannot run away.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Optional, Sequence

MAX_RENDERED_CHARS = 4_000_000
MAX_RANGE_STEPS = 1_000_000  # all range() iterations of one render together


class ChatTemplateError(ValueError):
    """The chat template is invalid, raised an error, or tried something unsafe."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(value: Any, indent: Optional[int] = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatFormatter:
    """Renders a list of chat messages to a prompt with one Jinja template."""

    def __init__(self, template: str, *, eos_token: str = "", bos_token: str = "") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
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
        except (OverflowError, RecursionError, TypeError, ValueError, KeyError,
                AttributeError, IndexError, ZeroDivisionError) as err:
            if isinstance(err, ChatTemplateError):
                raise
            raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from err
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
