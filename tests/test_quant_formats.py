"""GGUF block formats through lmlab's exact kernels: on random blocks (random bytes, fp16 scales spread
over 2^-24 .. 6e4, subnormals included) the unpacked weights equal `gguf.quants` dequantization bit for
bit, and each kernel's result equals that weight times the activations up to fp32 rounding (the
standard bound for a k-term fp32 dot product, k eps sum |x_j w_j|, with the offsets' terms counted)."""

import numpy as np
import pytest
import torch
from peers import needs, require_module

from lmlab.nn.quant import GroupLinear, Int4Linear, linear_from_blocks
from lmlab.nn.quant_formats import BLOCKS, unpack

gguf = require_module("gguf")
pytestmark = needs("kernels")
EPS = float(np.finfo(np.float32).eps)
_SCALE_BYTES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator, extreme: bool) -> np.ndarray:
    """Random bytes for n rows of k inputs, with every fp16 scale finite: moderate, or over fp16's range."""
    size, nbytes = BLOCKS[qtype]
    raw = rng.integers(0, 256, (n, k // size, nbytes), dtype=np.uint8)
    for off in _SCALE_BYTES[qtype]:
        mag = np.exp2(rng.uniform(-24, 15.9, raw.shape[:2])) if extreme else rng.uniform(1e-3, 3e-2, raw.shape[:2])
        h = (mag * rng.choice([-1.0, 1.0], raw.shape[:2])).astype(np.float16)
        raw[..., off:off + 2] = h.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_kernel_equals_gguf_dequantization_times_x(qtype, extreme):
    rng = np.random.default_rng(len(qtype) + 7 * extreme)
    n, k = 40, 512
    raw = random_blocks(qtype, n, k, rng, extreme)
    w_ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])  # float32 [n, k]
    u = unpack(raw, qtype, n, k)
    np.testing.assert_array_equal(u.dequantize(), w_ref)
    layer = linear_from_blocks([u], prefill_dtype=torch.float32)
    assert isinstance(layer, Int4Linear if qtype in ("Q4_0", "Q4_1", "Q4_K") else GroupLinear)
    torch.testing.assert_close(layer.dequantized_weight(), torch.from_numpy(w_ref), rtol=0, atol=0)
    for rows in (1, 3, 9):  # the kernel (decoding, <= 4 rows) and the dense path over many rows
        x = rng.standard_normal((rows, k)).astype(np.float32)
        got = layer(torch.from_numpy(x)).double().numpy()
        exact = x.astype(np.float64) @ w_ref.astype(np.float64).T
        # the kernels sum d dot(x, q) + m sum(x) per group: bound the terms of both groupings
        dq = u.d[..., None] * u.codes.astype(np.float32).reshape(n, -1, u.group)
        mag = np.abs(dq).reshape(n, k) + (0 if u.m is None else np.repeat(np.abs(u.m), u.group, 1))
        bound = 2 * k * EPS * (np.abs(x).astype(np.float64) @ mag.astype(np.float64).T)
        assert np.all(np.abs(got - exact) <= bound + 1e-30), (qtype, rows)


def test_fused_mixed_types_equal_their_parts():
    """Q4_K_M keeps q/k in Q4_K and v in Q6_K: the fused projection is each part's exact weight."""
    rng = np.random.default_rng(3)
    parts = [("Q4_K", 32), ("Q4_K", 16), ("Q6_K", 16), ("Q8_0", 8)]
    ups = [unpack(random_blocks(t, n, 256, rng, False), t, n, 256) for t, n in parts]
    layer = linear_from_blocks(ups)
    assert isinstance(layer, GroupLinear) and layer.group == 16
    want = np.concatenate([u.dequantize() for u in ups])
    np.testing.assert_array_equal(layer.dequantized_weight().numpy(), want)
    x = torch.from_numpy(rng.standard_normal((1, 256)).astype(np.float32))
    torch.testing.assert_close(layer(x), x @ torch.from_numpy(want).T, rtol=1e-5, atol=1e-5)
    four = linear_from_blocks([ups[0], ups[1]])
    assert isinstance(four, Int4Linear) and four.dm.dtype == torch.float32  # K-quant scales are not fp16
    np.testing.assert_array_equal(four.dequantized_weight().numpy(), want[:48])


def test_unknown_format_and_ragged_rows_are_errors():
    with pytest.raises(ValueError, match="no exact kernel for IQ4_XS"):
        unpack(np.zeros(136, np.uint8), "IQ4_XS", 1, 256)
    with pytest.raises(ValueError, match="not whole blocks"):
        unpack(np.zeros(144, np.uint8), "Q4_K", 1, 128)
