"""The block kernels (lmlab/nn/quant_kernels.py) against PyTorch computing the same thing in float64 or
with its own ops: Q4_1 / Q8_0 matmuls and dequantization on GGUF-style blocks (fp16 scales), RMSNorm,
decoding attention over a strided grouped-query KV cache, and RoPE with the cache write."""

import pytest
import torch
import torch.nn.functional as F
from peers import needs

from lmlab.nn import quant_kernels as qk
from lmlab.nn.position import RotaryEmbedding

pytestmark = needs("kernels")


def q4_1_blocks(n: int, k: int, gen: torch.Generator):
    """(qs, dm, W): random Q4_1 blocks as GGUF stores them (d, m in fp16) and their float32 weight."""
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half()
    m = (-8 * d.float() + torch.randn(n, k // 32, generator=gen) * 1e-3).half()
    w = (d.float()[..., None] * q.float() + m.float()[..., None]).view(n, k)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    return qs, torch.stack([d, m], dim=-1), w


def q8_0_blocks(n: int, k: int, gen: torch.Generator):
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01).half()
    return q, d, (q.float().view(n, -1, 32) * d.float()[..., None]).view(n, k)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_block_matmuls_match_float64(rows, threads):
    gen = torch.Generator().manual_seed(0)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [(*q4_1_blocks(96, 160, gen), qk.q4_1_matmul), (*q8_0_blocks(80, 96, gen), qk.q8_0_matmul)]
        for qs, scales, w, fn in cases:
            x = torch.randn(rows, w.shape[1], generator=gen)
            want = x.double() @ w.double().T
            got = fn(x, qs, scales)
            assert got.shape == (rows, w.shape[0]) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(prev)


def test_dequantize_gives_the_exact_weights_in_fp32_and_bf16():
    gen = torch.Generator().manual_seed(1)
    qs, dm, w = q4_1_blocks(40, 64, gen)
    assert torch.equal(qk.q4_1_dequantize(qs, dm, torch.float32), w)
    assert torch.equal(qk.q4_1_dequantize(qs, dm, torch.bfloat16), w.bfloat16())  # rounded to nearest even
    q8, d8, w8 = q8_0_blocks(40, 64, gen)
    assert torch.equal(qk.q8_0_dequantize(q8, d8, torch.float32), w8)
    assert torch.equal(qk.q8_0_dequantize(q8, d8, torch.bfloat16), w8.bfloat16())


def test_rms_norm_matches_pytorch():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 3, 72, generator=gen) * 5, torch.randn(72, generator=gen)  # 72: a vector tail
    torch.testing.assert_close(qk.rms_norm(x, w, 1e-5), F.rms_norm(x, (72,), w, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("length", [1, 37])
def test_decode_attention_matches_sdpa_on_a_strided_gqa_cache(head_dim, length, dtype):
    gen = torch.Generator().manual_seed(3)
    B, nh, nkv, max_len = 2, 6, 2, 50
    q = torch.randn(B, nh + 2 * nkv, 1, head_dim, generator=gen)[:, :nh] * 3  # a view, as in Attention
    cache = torch.randn(2, B, nkv, max_len, head_dim, generator=gen).to(dtype)
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]  # strided views of a preallocated cache
    # an fp16 cache is attended in fp32: the same as PyTorch's attention over its exact fp32 values
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(qk.sdpa(q, k, v, enable_gqa=True), want, rtol=1e-5, atol=1e-5)
    # cases the kernel does not take go to PyTorch
    x = torch.randn(B, nh, 3, head_dim, generator=gen).to(dtype)
    torch.testing.assert_close(qk.sdpa(x, k, v, enable_gqa=True),
                               F.scaled_dot_product_attention(x, k, v, enable_gqa=True))


def test_rope_store_rotates_queries_in_place_and_writes_keys_and_values():
    gen = torch.Generator().manual_seed(4)
    nh, nkv, hd, max_len, pos = 4, 2, 32, 9, 5
    heads = torch.randn(nh + 2 * nkv, hd, generator=gen)
    rope = RotaryEmbedding(hd, 10000.0)
    want = rope.rotary(torch.tensor([[pos]]))(heads[:nh + nkv].view(1, -1, 1, hd)).view(-1, hd)
    cos, sin = (t.reshape(-1).contiguous() for t in rope.cos_sin(torch.tensor([[pos]])))
    kc, vc = torch.zeros(nkv, max_len, hd), torch.zeros(nkv, max_len, hd)
    got = heads.clone()
    qk.rope_store(got, cos, sin, nh, nkv, kc[:, pos], vc[:, pos])
    torch.testing.assert_close(got[:nh], want[:nh], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc[:, pos], want[nh:], rtol=1e-6, atol=1e-6)
    assert torch.equal(vc[:, pos], heads[nh + nkv:])
    assert kc[:, :pos].abs().sum() == 0 and vc[:, pos + 1:].abs().sum() == 0  # nothing else written


def test_rope_store_into_an_fp16_cache_rounds_as_torch_does():
    gen = torch.Generator().manual_seed(4)
    nh, nkv, hd, pos = 2, 2, 64, 3
    heads = torch.randn(nh + 2 * nkv, hd, generator=gen)
    # value heads with every rounding case: subnormals (ties included), the normal range's ties, the
    # largest finite values, overflow to inf, signed zeros
    tiny = torch.tensor([2.0 ** -24 * (k + 0.5) for k in range(8)] + [2.0 ** -25, 2.0 ** -26, 2.0 ** -14 * 0.99999])
    ties = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2048 + 1.0, 2048 + 3.0])
    big = torch.tensor([65504.0, 65519.0, 65520.0, 1e6, 0.0, -0.0])
    special = torch.cat([tiny, -tiny, ties, -ties, big, -big])
    heads[nh + nkv, :len(special)] = special
    heads[nh + nkv + 1] = torch.randn(hd, generator=gen) * torch.logspace(-9, 5, hd)
    rope = RotaryEmbedding(hd, 10000.0)
    cos, sin = (t.reshape(-1).contiguous() for t in rope.cos_sin(torch.tensor([[pos]])))
    k32, v32 = torch.zeros(nkv, 8, hd), torch.zeros(nkv, 8, hd)
    k16, v16 = torch.zeros(nkv, 8, hd, dtype=torch.float16), torch.zeros(nkv, 8, hd, dtype=torch.float16)
    qk.rope_store(heads.clone(), cos, sin, nh, nkv, k32[:, pos], v32[:, pos])
    qk.rope_store(heads.clone(), cos, sin, nh, nkv, k16[:, pos], v16[:, pos])
    # bit for bit what .half() (IEEE round to nearest even) makes of the float32 values
    assert torch.equal(k16.view(torch.int16), k32.half().view(torch.int16))
    assert torch.equal(v16.view(torch.int16), v32.half().view(torch.int16))
    assert torch.isinf(v16[0, pos, :len(special)]).sum() == 4  # 65520 and 1e6, both signs


@pytest.mark.parametrize("threads", [1, 2])
def test_repacked_decoding_matmuls_match_float64(threads):
    gen = torch.Generator().manual_seed(5)
    nt = qk.set_threads(threads)  # 2: rows split into tiles over numba's pool
    assert 2100 * 2048 >= qk._PARALLEL_BYTES
    # more rows than a tile (2048), and codes past qk._PARALLEL_BYTES (smaller matrices stay on one thread)
    qs, dm, w = q4_1_blocks(2100, 4096, gen)
    x = torch.randn(4096, generator=gen)
    y = torch.empty(2100)
    qk._q4_1_mv_t(*qk.repack_q4_1(qs, dm), x.numpy(), y.numpy(), nt)
    torch.testing.assert_close(y.double(), w.double() @ x.double(), rtol=1e-5, atol=1e-5)
    q8, d8, w8 = q8_0_blocks(2100, 2048, gen)
    x = torch.randn(2048, generator=gen)
    y = torch.empty(2100)
    qt, d = qk.repack_q8_0(q8, d8)
    qk._qg_mv_t(qt, d, d[:0], x.numpy(), y.numpy(), nt)  # Q8_0: the group kernel without offsets
    torch.testing.assert_close(y.double(), w8.double() @ x.double(), rtol=1e-5, atol=1e-5)


def test_dense_gemm_for_prefill_keeps_float32_accuracy():
    """`_gemm` (oneDNN's GEMM where PyTorch has it) must not round its inputs: an error at float32's level
    against float64, where a bf16 down-conversion would be ~2^-9 of |x| |w|."""
    gen = torch.Generator().manual_seed(3)
    x, wt = torch.randn(256, 576, generator=gen), torch.randn(576, 1536, generator=gen)
    err = (qk._gemm(x, wt).double() - x.double() @ wt.double()).abs() / (x.double().abs() @ wt.double().abs())
    assert err.max() < 2 ** -18
    x = torch.zeros(64, 64)
    x[:, 0] = 1 + 2 ** -10 + 2 ** -20  # 21 significant bits: exact in fp32, not in bf16 or bf16 hi + lo
    wt = torch.zeros(64, 64)
    wt[0] = 1
    assert torch.equal(qk._gemm(x, wt), x[:, :1].expand(64, 64))


@pytest.mark.parametrize("scratch", [qk.SCRATCH_FLOATS, 32 * 160])  # one chunk; many chunks and a remainder
def test_block_major_mm_matches_float64(monkeypatch, scratch):
    """Many rows (prefill) on block-major codes: the exact weights a chunk at a time, then the GEMM."""
    monkeypatch.setattr(qk, "SCRATCH_FLOATS", scratch)
    monkeypatch.setattr(qk, "_SCRATCH", type(qk._SCRATCH)())
    gen = torch.Generator().manual_seed(4)
    qs, dm, w = q4_1_blocks(200, 160, gen)
    x = torch.randn(37, 160, generator=gen)
    args = qk.linear_args(qk.to_block_major(qs), dm)
    y = qk.block_major_mm(x, args)
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=0, atol=1e-4)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("scratch", [qk.SCRATCH_FLOATS, 32 * 160])  # each half at once; in chunks
def test_block_major_swiglu_matches_float64(monkeypatch, scratch, onednn):
    """The MLP's fused gate-and-up path: silu(x Wg^T) * (x Wu^T) with W = [Wg; Wu], the silu and the product
    as oneDNN post-ops (or torch ops without oneDNN, and after a chunked GEMM), equal to float64."""
    monkeypatch.setattr(qk, "SCRATCH_FLOATS", scratch)
    monkeypatch.setattr(qk, "_SCRATCH", type(qk._SCRATCH)())
    if not onednn:
        monkeypatch.setattr(qk, "_ONEDNN", False)
    gen = torch.Generator().manual_seed(6)
    qs, dm, w = q4_1_blocks(2 * 150, 160, gen)
    x = torch.randn(37, 160, generator=gen)
    y = qk.block_major_swiglu(x, qk.linear_args(qk.to_block_major(qs), dm))
    h = x.double() @ w.double().T
    want = torch.nn.functional.silu(h[:, :150]) * h[:, 150:]
    assert y.shape == (37, 150)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    # rows start .. start + count of W alone
    part = qk.block_major_mm(x, qk.linear_args(qk.to_block_major(qs), dm), 150, 100)
    torch.testing.assert_close(part.double(), h[:, 150:250], rtol=0, atol=1e-4)
