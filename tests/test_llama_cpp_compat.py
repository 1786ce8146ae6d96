"""A llama-cpp-python script body runs against sambay unchanged (only the import differs), and
llama-cpp-python's constructor keywords are mapped or warned about."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from sambay import Llama, LogitsProcessorList, StoppingCriteriaList
from sambay.convert import convert, tiny


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    ck = tiny.write_checkpoint(root / "ck", "tiny-12", seed=2)
    return str(convert(ck, root / "m.gguf", outtype="f32", progress=False))


def script_body(Llama, LogitsProcessorList, StoppingCriteriaList, model_path):  # noqa: N803
    """What a llama-cpp-python user writes (from its README and examples), unchanged."""
    llm = Llama(model_path=model_path, n_ctx=256, n_batch=64, n_ubatch=32, n_threads=2, n_gpu_layers=0,
                seed=-1, use_mlock=False, use_mmap=True, flash_attn=False, logits_all=True,
                last_n_tokens_size=64, offload_kqv=True, verbose=False)
    out = llm("Q: Name the planets in the solar system? A: ", max_tokens=8, stop=["Q:", "\n"], echo=True)
    text = out["choices"][0]["text"]
    assert text.startswith("Q: Name the planets")
    llm.set_seed(1337)
    tokens = llm.tokenize(b"Hello, world!")
    assert llm.detokenize(tokens) == b"Hello, world!"
    tokenizer = llm.tokenizer()
    assert tokenizer.encode("Hello, world!") == tokens
    assert tokenizer.decode(tokens) == "Hello, world!"
    end = tokenizer.encode("<|end|>")  # special tokens parsed by default, as in llama-cpp-python
    assert len(end) == 1 and len(tokenizer.encode("<|end|>", special=False)) > 1
    llm.reset()
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    assert llm.scores.shape == (len(tokens), llm.n_vocab())
    assert len(llm.eval_logits) == len(tokens)
    last = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    assert 0 <= last < llm.n_vocab()

    def no_eos(input_ids, scores):
        scores[llm.token_eos()] = -np.inf
        return scores

    def stop_at_ten(input_ids, logits):
        return len(input_ids) >= 10

    out = llm.create_completion("The answer is", max_tokens=32, temperature=0.7, top_p=0.9, top_k=40,
                                repeat_penalty=1.1, logits_processor=LogitsProcessorList([no_eos]),
                                stopping_criteria=StoppingCriteriaList([stop_at_ten]))
    assert out["choices"][0]["finish_reason"] == "stop"
    pieces = []
    for chunk in llm.create_chat_completion(
            messages=[{"role": "system", "content": "You are an assistant."},
                      {"role": "user", "content": "Describe this image in detail please."}],
            max_tokens=8, stream=True):
        delta = chunk["choices"][0]["delta"]
        if "content" in delta:
            pieces.append(delta["content"])
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=4)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    info = (llm.n_ctx(), llm.n_vocab(), llm.n_embd(), llm.token_eos(), llm.token_bos(), llm.token_nl())
    llm.close()
    return info


def test_a_llama_cpp_python_script_runs_unchanged(model_path):
    pytest.importorskip("llguidance")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_mlock & co. warn: they change nothing here
        n_ctx, n_vocab, n_embd, eos, bos, nl = script_body(Llama, LogitsProcessorList, StoppingCriteriaList,
                                                           model_path)
    assert n_ctx == 256 and n_embd > 0 and 0 <= nl < n_vocab and eos is not None


def test_constructor_keywords(model_path, caplog):
    with pytest.raises(TypeError, match="n_ctxx"):
        Llama(model_path, n_ctxx=128)
    with pytest.raises(ValueError, match="chat_format='llama-2' is not one of sambay's templates"):
        Llama(model_path, chat_format="llama-2", verbose=False)
    with pytest.raises(ValueError, match="not both"):
        Llama(model_path, chat_format="chatml", chat_template="phi3", verbose=False)
    with pytest.raises(ValueError, match="type_k"):
        Llama(model_path, type_k=8, verbose=False)  # q8_0: no quantized caches here
    with pytest.raises(ValueError, match="same"):
        Llama(model_path, type_k="f16", type_v="f32", verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Llama(model_path, n_ctx=64, rope_freq_base=10000.0, verbose=False).close()
        Llama(model_path, n_ctx=64, rope_freq_base=10000.0, verbose=False).close()
    assert sum("rope_freq_base" in str(w.message) for w in caught) == 1  # once
    with caplog.at_level(logging.INFO, logger="sambay"):
        llm = Llama(model_path, n_ctx=64, n_batch=64, n_ubatch=16, flash_attn=True, type_k=0, type_v="F32",
                    seed=0xFFFFFFFF)
    assert llm._ctx.n_batch == 16 and llm._ctx.flash_attn
    assert "kv f32" in caplog.text and "flash_attn True" in caplog.text  # verbose logs the load
    assert llm("x", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1
    llm.close()


def test_chat_format_and_chat_template_replace_the_gguf_template(model_path):
    from sambay.chat import BUILTIN_TEMPLATES, ChatTemplateError

    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "12 + 34?"}]
    with Llama(model_path, n_ctx=128, verbose=False) as llm:
        assert llm.chat_template == llm.metadata["tokenizer.chat_template"]  # the GGUF's by default
        own = llm.chat_prompt(messages)[0]
    assert own.startswith("<|system|>Be terse.<|end|>")
    with Llama(model_path, n_ctx=128, chat_format="chatml", verbose=False) as llm:  # llama-cpp-python's keyword
        assert llm.chat_template == BUILTIN_TEMPLATES["chatml"]
        text, tokens = llm.chat_prompt(messages)
        assert text == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n12 + 34?<|im_end|>\n" \
                       "<|im_start|>assistant\n"
        reply = llm.create_chat_completion(messages, max_tokens=2, temperature=0)
        assert reply["usage"]["prompt_tokens"] == len(tokens)  # the completion renders the same text
    jinja = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}A:"
    with Llama(model_path, n_ctx=128, chat_template=jinja, verbose=False) as llm:
        assert llm.chat_prompt(messages)[0] == "system: Be terse.\nuser: 12 + 34?\nA:"
    # a bad template fails the load with the template's own error
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        Llama(model_path, chat_template="{% for m in messages %}", verbose=False)
    with pytest.raises(ChatTemplateError, match="unknown chat template name 'vicuna'"):
        Llama(model_path, chat_template="vicuna", verbose=False)
