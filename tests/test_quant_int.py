"""Decoding on int8 planes of the activations (lmlab/nn/quant_int.py): the kernels against float64 on the
same quantized activations (so only the order of fp32 sums differs), the activations' quantization
itself, the generic code a CPU without VNNI runs, and the decoding step built on them."""

import numba
import numpy as np
import pytest
import torch
from peers import needs

from lmlab.nn import quant_int as qi
from lmlab.nn import quant_kernels as qk

pytestmark = needs("kernels")


def reference_quantize(x: np.ndarray, g: int, planes: int) -> tuple[np.ndarray, np.ndarray]:
    """(v [k] as float64 integers, dx [k/g]) as the module documents them, computed with numpy."""
    vmax = np.float32(qi.V_TWO if planes == 2 else qi.V_ONE)
    xb = x.reshape(-1, g)
    amax = np.abs(xb).max(1)
    dx = amax / vmax
    inv = np.where(amax > 0, vmax / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    v = np.rint(xb * inv[:, None])
    if planes == 2:  # what the two int8 planes hold: 128 vh + vl
        vh = np.rint(v.astype(np.float32) * np.float32(1 / 128))
        v = 128 * vh + (v - 128 * vh)
    return v.reshape(-1).astype(np.float64), dx


def want(w_int: np.ndarray, d: np.ndarray, m: np.ndarray | None, x: np.ndarray, g: int, planes: int):
    """y = sum over blocks of d dx sum(q v) + m dx sum(v): the weights times the quantized activations, in
    float64, from the weights' integer codes."""
    v, dx = reference_quantize(x, g, planes)
    n, k = w_int.shape
    prod = (w_int.astype(np.float64) * v).reshape(n, k // g, g).sum(-1) * dx.astype(np.float64)
    y = (prod * d.astype(np.float64)).sum(-1)
    if m is not None:
        y += (m.astype(np.float64) * v.reshape(-1, g).sum(-1) * dx.astype(np.float64)).sum(-1)
    return y


@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("n", [16, 200, 1040])
def test_q4_1_rows_match_float64_on_the_same_quantized_activations(planes, n):
    rng = np.random.default_rng(n + planes)
    k = 160
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
    d = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
    m = (-8 * d.astype(np.float32) + rng.standard_normal(d.shape) * 1e-3).astype(np.float16)
    d[0, 0], d[-1, -1], m[1, 0] = np.float16(65504), np.float16(2 ** -24), np.float16(-65504)  # fp16's extremes
    qs = torch.from_numpy(q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    qt, dd, mm = qk.repack_q4_1(qs, torch.from_numpy(np.stack([d, m], -1)))
    x = rng.standard_normal(k).astype(np.float32)
    x[5] = 0.0
    x[32:64] = 0.0  # a block of zeros: step 0
    y = np.full(n, np.nan, np.float32)
    stop = qi.rows_int(qt, dd, mm, x, y, 0, n, planes, True, 32)
    assert stop == n // 16 * 16
    ref = want(q.reshape(n, k), d.astype(np.float32), m.astype(np.float32), x, 32, planes)
    np.testing.assert_allclose(y[:stop], ref[:stop], rtol=2e-6, atol=1e-6 * np.abs(ref).max())
    assert np.isnan(y[stop:]).all()  # what is left over is the caller's


@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("g,offsets", [(32, False), (16, True)])
def test_int8_group_codes_match_float64(planes, g, offsets):
    """Q8_0 (g 32, no offsets) and K-quant style groups of 16 with offsets: codes made unsigned by +128,
    which each block's correction takes off again."""
    rng = np.random.default_rng(g)
    n, k = 96, 128
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    q[0, :g] = -128  # the extreme codes
    q[1, :g] = 127
    d = (rng.random((n, k // g)) * 0.01).astype(np.float32)
    m = (rng.standard_normal((n, k // g)) * 0.1).astype(np.float32) if offsets else None
    qt, dd, mm = qk.repack_group(torch.from_numpy(q), torch.from_numpy(d),
                                 torch.from_numpy(m) if offsets else None)
    x = (rng.standard_normal(k) * 50).astype(np.float32)
    y = np.empty(n, np.float32)
    qi.rows_int(qt.view(np.int32), dd, mm if offsets else dd, x, y, 0, n, planes, offsets, g)
    ref = want(q, d, m, x, g, planes)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


def test_two_planes_quantize_each_activation_to_a_32512th_of_its_block():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(256) * np.repeat([1e-3, 1.0, 1e3, 7.0, 0.5, 2.0, 1e-20, 3.0], 32)).astype(np.float32)
    for planes, vmax in ((1, qi.V_ONE), (2, qi.V_TWO)):
        xq = np.empty((planes, 256), np.int8)
        dx, sx, corr = np.empty(8, np.float32), np.empty(8, np.float32), np.empty(8, np.int32)
        qi.quantize(x, 32, planes, True, xq, dx, sx, corr)
        v = xq[0].astype(np.int64) * (128 if planes == 2 else 1) + (xq[1].astype(np.int64) if planes == 2 else 0)
        amax = np.abs(x.reshape(8, 32)).max(1)
        err = np.abs(v.reshape(8, 32) * dx[:, None].astype(np.float64) - x.reshape(8, 32))
        assert (err <= amax[:, None] / vmax * 0.5 * (1 + 1e-5)).all()  # half a step
        assert np.abs(v).max() <= vmax and (planes == 1 or np.abs(xq[1]).max() <= 64)
        # the offsets' sums: of the quantized activations, as the codes' term sees them
        np.testing.assert_allclose(sx, dx * v.reshape(8, 32).sum(1), rtol=1e-6)
        assert (corr == 128 * v.reshape(8, 32).sum(1)).all()


def test_generic_code_without_vnni_gives_the_same_sums():
    """The IR a CPU without AVX-512 VNNI runs (widened products, summed in fours) equals the VNNI one."""
    generic, native = qi._make_tile(16, 2, vnni=False), qi._make_tile(16, 2)

    @numba.njit
    def both(qt, d, m, xw, dx, sx, corr, y1, y2):
        y1[:] = 0.0
        y2[:] = 0.0
        generic(qt, d, m, xw, dx, sx, corr, y1, 0, 0, qt.shape[0])
        native(qt, d, m, xw, dx, sx, corr, y2, 0, 0, qt.shape[0])

    rng = np.random.default_rng(4)
    for qt, signed in ((rng.integers(0, 2 ** 32, (3, 4, 16), dtype=np.uint32), False),  # Q4_1 words
                       (rng.integers(-2 ** 31, 2 ** 31, (3, 8, 16), dtype=np.int32), True)):  # int8 codes
        g = 32
        x = rng.standard_normal(3 * g).astype(np.float32)
        xq = np.empty((2, 3 * g), np.int8)
        dx, sx, corr = np.empty(3, np.float32), np.empty(3, np.float32), np.empty(3, np.int32)
        qi.quantize(x, g, 2, True, xq, dx, sx, corr)
        if not signed:
            corr[:] = 0
        d = rng.random((3, 16)).astype(np.float32)
        y1, y2 = np.empty(16, np.float32), np.empty(16, np.float32)
        both(qt, d, d, xq.view(np.int32), dx, sx, corr, y1, y2)
        assert np.array_equal(y1, y2) and np.abs(y1).max() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_a_gguf_model_decodes_on_int8_planes_by_default_where_vnni_runs(tmp_path, threads):
    """On one thread and on a team of two (the rows split in whole 16s, as the integer tiles need)."""
    from lmlab.generate.fast_decode import FastDecoder
    from lmlab.io.gguf.write import save_gguf
    from lmlab.io.load import load_model
    from lmlab.models.transformer.llama import Llama, LlamaConfig
    from lmlab.tokenizers import BPETokenizer

    tok = BPETokenizer.train(["the theater in the rain", "def f(x): return x + 1"] * 10, vocab_size=300,
                             min_count=1)
    torch.manual_seed(0)
    tiny = Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=64, mlp_hidden=96)).eval()
    path = save_gguf(tiny, tmp_path / "tiny.gguf", tok, qtype="Q4_1")
    prompt = torch.tensor([[5, 17, 3, 90]])
    tokens = torch.randint(0, tok.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    logits = {}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for precision in ("gguf-exact", "gguf", "gguf-q8"):
            model = load_model(path, precision=precision).model
            assert model.decode_activations == {"gguf-exact": "fp32", "gguf-q8": "int8"}.get(
                precision, "int16" if qi.available() else "fp32")
            cache = model.make_kv_cache(1, 20)
            with torch.no_grad():
                model(prompt, kv_cache=cache)
                fast = FastDecoder.build(model, cache)
                assert fast.activations == model.decode_activations and fast.split == (threads > 1)
                logits[precision] = torch.cat([fast.step(t.view(1)) for t in tokens])
    finally:
        torch.set_num_threads(prev)
    ref = logits["gguf-exact"]
    scale = ref.abs().max().item()
    err16 = (logits["gguf"] - ref).abs().max().item() / scale
    err8 = (logits["gguf-q8"] - ref).abs().max().item() / scale
    assert err8 > 0 and err8 < 0.1
    if qi.available():  # two planes: ~128x closer than one
        assert 0 < err16 < err8 / 20, (err16, err8)
