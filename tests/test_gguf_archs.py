"""Qwen2 and Llama-3 GGUF files as people download them, made here: a tiny random transformers model,
written as an F32 GGUF by lmlab's writer, quantized by llama.cpp's own quantizer
(`llama_model_quantize`, from llama-cpp-python) to Q4_K_M and the other block types.

- F32: lmlab's logits equal transformers' (Qwen2's q/k/v biases, Llama 3.1's RoPE scaling carried as
  `rope_freqs.weight`, at positions past the original context); tokenizer (`qwen2` / `llama-bpe`
  pre-tokenizers) and chat template (ChatML / Llama 3's) as transformers reads the same file.
- Quantized: kept in their blocks (precision "gguf"), our logits -- prefill, token by token through
  the KV cache, and generation's fast step -- are within 1e-3 of our float32 dequantization of the
  same file."""

import ctypes

import pytest
import torch
from peers import needs, require_module

gguf = require_module("gguf")
transformers = require_module("transformers")
require_module("accelerate")  # transformers' GGUF loading needs it
llama_cpp = require_module("llama_cpp")

from lmlab.generate.fast_decode import FastDecoder  # noqa: E402
from lmlab.io.gguf.read import load_gguf, open_gguf  # noqa: E402
from lmlab.io.gguf.write import save_gguf  # noqa: E402
from lmlab.io.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from lmlab.models.registry import build  # noqa: E402
from lmlab.nn.quant import GroupLinear, Int4Linear, quantize_  # noqa: E402
from lmlab.tokenizers import BPETokenizer  # noqa: E402
from lmlab.tokenizers.base import SpecialTokens  # noqa: E402
from lmlab.tokenizers.chat_template import chat_template_for  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = needs("kernels")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
TEXTS = ["It's 12345 apples -- we'll see\n\n  them   rain 7", "def f(x):\n\treturn x+1  # 3.14159"]
LINES = ["the theater in the rain, it's 2024", "def f(x):\n    return x + 1", "we'll see 123 456 7890"] * 20
# llama.cpp's file types (llama.h llama_ftype) and the block types each must produce at these shapes
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}


def _tokenizer(arch: str) -> BPETokenizer:
    if arch == "qwen2":
        sp = SpecialTokens(bos="<|endoftext|>", eos="<|im_end|>", mask="<|im_start|>")
    else:
        sp = SpecialTokens(bos="<|begin_of_text|>", eos="<|eot_id|>", mask="<|start_header_id|>")
    tok = BPETokenizer.train(LINES, vocab_size=320, min_count=1, specials=sp)
    if arch == "llama":
        tok.hf.add_special_tokens(["<|end_header_id|>"])
    tok.chat_template = CHATML if arch == "qwen2" else LLAMA3
    tok.gguf_pre = "qwen2" if arch == "qwen2" else "llama-bpe"
    return tok


def _hf_model(arch: str, vocab: int):
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05)
    if arch == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True,
                                                                    rope_theta=1e6)).eval()
        with torch.no_grad():  # transformers initialises biases to zero: make them count
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    else:  # Llama 3.1's scaling, its original context shrunk to 32 so that the test's positions pass it
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 5e5}
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=False,
                                                                    rope_parameters=rope)).eval()
    return hf


def _quantize(src, dst, ftype: int) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def files(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    tok = _tokenizer(arch)
    hf = _hf_model(arch, tok.vocab_size)
    cfg = config_from_hf(hf.config.to_dict())
    ours = build(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    f32 = save_gguf(ours.eval(), d / "f32.gguf", tok, qtype="F32")
    out = {"F32": f32}
    for name, ftype in FTYPES.items():
        _quantize(f32, d / f"{name}.gguf", ftype)
        out[name] = d / f"{name}.gguf"
    return arch, hf, tok, out


@torch.no_grad()
def test_f32_file_matches_transformers(files):
    arch, hf, _, paths = files
    ours, _ = load_gguf(paths["F32"])
    names = {t.name for t in open_gguf(paths["F32"]).tensors}
    if arch == "qwen2":
        assert ours.config.qkv_bias and "blk.0.attn_q.bias" in names and "blk.0.attn_output.bias" not in names
    else:
        assert "rope_freqs.weight" in names and ours.config.rope_scaling["rope_type"] == "freq_factors"
    x = torch.randint(0, hf.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-4, atol=1e-4)


def test_tokenizer_and_chat_template_match_transformers(files):
    arch, _, tok, paths = files
    _, ours = load_gguf(paths["F32"])
    theirs = transformers.AutoTokenizer.from_pretrained(paths["F32"].parent, gguf_file=paths["F32"].name)
    assert ours.gguf_pre == ("qwen2" if arch == "qwen2" else "llama-bpe")
    for text in TEXTS:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    pieces = [p for p, _ in ours.hf.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == (list("12345") if arch == "qwen2" else ["123", "45"])  # Qwen2: single digits; Llama 3: <= 3
    msgs = [{"role": "user", "content": "hi 42"}, {"role": "assistant", "content": "it's 7"}, {"role": "user",
                                                                                             "content": "and?"}]
    want = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat_template_for(ours).render(msgs) == want


@pytest.mark.parametrize("name", list(FTYPES))
@torch.no_grad()
def test_quantized_file_in_blocks_matches_its_float32_dequantization(files, name):
    _, _, _, paths = files
    types = {t.tensor_type.name for t in open_gguf(paths[name]).tensors}
    want = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}}.get(name, {name})
    assert want <= types, types
    ref, _ = load_gguf(paths[name])  # float32: gguf.quants' dequantization of every tensor
    ours, _ = load_gguf(paths[name], blocks=True, prefill_dtype=torch.float32)
    quantize_(ours, "gguf-exact")  # exact kernels: fp32 activations
    assert not any(isinstance(m, torch.nn.Linear) for m in ours.modules())
    assert any(isinstance(m, (GroupLinear, Int4Linear)) for m in ours.modules())
    x = torch.randint(0, ref.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    want_logits = ref(x).logits
    torch.testing.assert_close(ours(x).logits, want_logits, rtol=0, atol=1e-3)  # prefill: many rows
    cache = ours.make_kv_cache(1, 48)
    steps = torch.cat([ours(x[:, i:i + 1], kv_cache=cache).logits for i in range(24)], dim=1)  # the kernels
    fast = FastDecoder.build(ours, cache)  # generation's one-call-per-layer step, on the same blocks
    assert fast is not None
    steps = torch.cat([steps, *(fast.step(x[:, i])[:, None] for i in range(24, 48))], dim=1)
    torch.testing.assert_close(steps, want_logits, rtol=0, atol=1e-3)
