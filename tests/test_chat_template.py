"""Chat templates: rendering matches transformers' `apply_chat_template`; the sandbox holds."""

import pytest
from peers import require_module

from lmlab.errors import LmlabError
from lmlab.tokenizers.chat_template import ChatTemplate

# ChatML as SmolLM2 / Qwen write it, with loop controls, tojson and raise_exception
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}\n"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi — 안녕 🎉"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_matches_transformers_apply_chat_template():
    transformers = require_module("transformers")
    from tokenizers import Tokenizer, models

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=CHATML)
    for gen in (True, False):
        for tools in (None, [{"name": "f", "description": "ü"}]):
            want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen, tools=tools)
            got = ChatTemplate(CHATML).render(MESSAGES, add_generation_prompt=gen, tools=tools)
            assert got == want


def test_raise_exception_is_an_lmlab_error():
    with pytest.raises(LmlabError, match="bad role"):
        ChatTemplate(CHATML).render([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("evil", ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                  "{% set xs = [] %}{{ xs.append(1) }}"])
def test_sandbox_refuses_internals_and_mutation(evil):
    with pytest.raises(LmlabError, match="sandbox"):
        ChatTemplate(evil).render([])


def test_bad_templates_and_messages():
    with pytest.raises(LmlabError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(LmlabError, match="no chat template"):
        ChatTemplate("")
    with pytest.raises(LmlabError, match="'role' and 'content'"):
        ChatTemplate(CHATML).render([{"content": "x"}])
