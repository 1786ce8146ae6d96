"""Chat templates render like transformers and are sandboxed."""

from __future__ import annotations

import pytest

from sambay.chat import ChatFormatter, ChatTemplateError
from sambay.convert import tiny

MESSAGES = [
    {"role": "system", "content": "You are Phi."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_phi4_mini_template():
    f = ChatFormatter(tiny.CHAT_TEMPLATE, eos_token="<|endoftext|>")
    assert f.render(MESSAGES) == (
        "<|system|>You are Phi.<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>"
        "<|user|>And 3+3?<|end|><|assistant|>")
    assert f.render(MESSAGES[:2], add_generation_prompt=False).endswith("<|end|><|endoftext|>")
    tools = [{"role": "system", "content": "S", "tools": '[{"name": "f"}]'}]
    assert f.render(tools, add_generation_prompt=False) == (
        '<|system|>S<|tool|>[{"name": "f"}]<|/tool|><|end|><|endoftext|>')


def test_matches_transformers_environment_options():
    # trim_blocks / lstrip_blocks as transformers sets them
    tpl = "{% for m in messages %}\n  {{ m['content'] }}\n{% endfor %}"
    assert ChatFormatter(tpl).render([{"role": "user", "content": "x"}]) == "  x\n"
    assert ChatFormatter("{{ messages[0] | tojson }}").render(
        [{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}'


def test_sandbox_blocks_python_internals():
    f = ChatFormatter("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="unsafe|failed"):
        f.render([{"role": "user", "content": "x"}])
    g = ChatFormatter("{{ ''.__class__.__base__ }}")
    with pytest.raises(ChatTemplateError):
        g.render([{"role": "user", "content": "x"}])


def test_huge_output_and_runaway_loops_are_bounded():
    f = ChatFormatter("{% for i in range(90000) %}{{ 'x' * 100 }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="exceeds"):
        f.render([{"role": "user", "content": "x"}])
    # 10^10 silent iterations would hang: the range budget stops them (a generous time limit, so
    # that on a loaded machine the budget, not the clock, is what this checks)
    g = ChatFormatter("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                      max_seconds=300)
    with pytest.raises(ChatTemplateError, match="loop iterations"):
        g.render([{"role": "user", "content": "x"}])
    h = ChatFormatter("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    with pytest.raises(ChatTemplateError):
        h.render([{"role": "user", "content": "x"}])


def test_raise_exception_and_bad_templates():
    with pytest.raises(ChatTemplateError, match="raised: nope"):
        ChatFormatter("{{ raise_exception('nope') }}").render([{"role": "user", "content": ""}])
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        ChatFormatter("{% for %}")


@pytest.mark.parametrize("messages", [
    "hello", [{"content": "no role"}], [{"role": "user", "content": 3}], [42],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
])
def test_bad_messages(messages):
    with pytest.raises(ChatTemplateError):
        ChatFormatter(tiny.CHAT_TEMPLATE).render(messages)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_same_text_as_transformers_apply_chat_template(tmp_path, add_generation_prompt):
    import transformers  # a test dependency (pyproject: test extra)
    folder = tiny.write_checkpoint(tmp_path / "ck", "tiny-8")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), chat_template=tiny.CHAT_TEMPLATE,
        eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    convs = [
        MESSAGES,
        [{"role": "system", "content": "S", "tools": '[{"name": "f"}]'},
         {"role": "user", "content": "naïve 東京 {{ not a tag }}"}],
        [{"role": "user", "content": "  spaces\n\nnewlines  "}],
    ]
    # a template with whitespace control, loops and filters, to compare environments
    fancy = ("{% for m in messages %}\n  {%- if loop.first %}[{{ m.role | upper }}]{% endif %}\n"
             "  {{ m['content'] | trim }}|{{ m | length }}\n{% endfor %}"
             "{% if add_generation_prompt %}<gen>{% endif %}")
    for template in (tiny.CHAT_TEMPLATE, fancy):
        ours = ChatFormatter(template, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        for messages in convs:
            want = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
            assert ours.render(messages, add_generation_prompt=add_generation_prompt) == want


# --- choosing the template (--chat-template, --chat-template-file, Llama(chat_template=)) ------

from sambay.chat import BUILTIN_TEMPLATES, choose_template, read_template_file  # noqa: E402


@pytest.mark.parametrize("name, want", [
    # llama.cpp's formats of these names (llm_chat_apply_template), written out by hand
    ("chatml", "<|im_start|>system\nYou are Phi.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"),
    ("phi3", "<|system|>\nYou are Phi.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
             "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n"),
    ("phi4", "<|im_start|>system<|im_sep|>You are Phi.<|im_end|><|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
             "<|im_start|>assistant<|im_sep|>4<|im_end|><|im_start|>user<|im_sep|>And 3+3?<|im_end|>"
             "<|im_start|>assistant<|im_sep|>"),
])
def test_builtin_templates_render_llama_cpp_formats(name, want):
    f = ChatFormatter(choose_template(name, tiny.CHAT_TEMPLATE))
    assert f.render(MESSAGES) == want
    # without the generation prompt the text ends after the last message
    assert want.startswith(f.render(MESSAGES, add_generation_prompt=False))
    assert f.render(MESSAGES, add_generation_prompt=False) != want


def test_choose_template():
    assert choose_template(None, tiny.CHAT_TEMPLATE) == tiny.CHAT_TEMPLATE  # the GGUF's by default
    assert choose_template(None, "") is None and choose_template(None, None) is None
    assert choose_template("chatml", tiny.CHAT_TEMPLATE) == BUILTIN_TEMPLATES["chatml"]
    jinja = "{{ messages[0].content }}"
    assert choose_template(jinja, tiny.CHAT_TEMPLATE) == jinja
    assert choose_template(jinja, None) == jinja
    for bad in ("llama3", "ChatML", "", "chatml "):  # names are exact; no guessing
        with pytest.raises(ChatTemplateError, match="unknown chat template name .*chatml, phi3, phi4"):
            choose_template(bad, tiny.CHAT_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="must be a string"):
        choose_template(b"chatml", None)  # type: ignore[arg-type]


def test_template_file_errors_name_the_file(tmp_path):
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", encoding="utf-8")
    assert read_template_file(str(good)) == good.read_text(encoding="utf-8")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")  # no endfor
    plain = tmp_path / "plain.jinja"
    plain.write_text("chatml", encoding="utf-8")
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"{{ '\xe9' }}")
    for path, what in ((broken, "invalid chat template: .*endfor"), (plain, "no Jinja tags"),
                       (latin, "not UTF-8"), (tmp_path / "missing.jinja", "No such file")):
        with pytest.raises(ChatTemplateError, match=f"chat template file {path}: {what}"):
            read_template_file(str(path))
