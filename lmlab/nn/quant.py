"""Inference precisions for a trained model, applied from outside it: `quantize_(model, "int4")`.

- `fp32`: as trained or imported (the reference).
- `bf16`: weights in bfloat16, matmuls in bf16 (CPUs with AVX512-BF16/AMX run them several times
  faster than fp32).
- `int8`: weight-only 8-bit, one scale per group of 32 inputs (GGUF's Q8_0, whose weights come back
  exactly).
- `int4`: weight-only 4-bit, asymmetric, one scale and offset per group of 32 inputs (GGUF's Q4_1,
  whose weights come back exactly).
- `gguf`: a GGUF file's block-quantized matrices as stored (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K, put
  into `Int4Linear` / `GroupLinear` by the loader without re-quantizing), the rest in fp32; on a model
  from elsewhere, fp32 with the decoding kernels. Its KV cache stays fp32 by default: fp16 K/V
  (llama.cpp's default, `model.kv_cache_dtype = torch.float16`, half the cache's memory; the kernels
  read it exactly into fp32) move SmolLM2-135M's decoding logits by up to 0.02, past the 1e-3 the
  exact path keeps (benchmarks/llm_inference.py, engine `lmlab-gguf-kv16`).

int8 and int4 keep their weights in GGUF's block layouts. Decoding a token reads every weight once,
so on a CPU it is bound by memory bandwidth and 4-bit blocks are fastest: a few rows go through our
kernels (lmlab/nn/quant_kernels.py), which multiply fp32 activations by the weights exactly as stored,
so each decoding step computes a GGUF model's own weights in the fp32 reference's arithmetic up to
summation order. Prefill is bound by compute: many rows at once go through a dense bf16 matmul on weights
dequantized on the fly (`prefill_dtype`; fp32 is exact but ~2x slower). On SmolLM2-135M
(benchmarks/llm_inference.py) int4 agrees with fp32 on every top-1 token over 256 positions both ways:
prefill (bf16, mean KL 3e-4 nats) and token by token through the KV cache (KL 1e-11).

In every low precision the output layer (shared with a tied embedding) keeps 8-bit blocks, its
logits exact in fp32. Without the kernels (numba missing, or LMLAB_NO_KERNELS=1) int4 falls back to PyTorch's
`_weight_int4pack_mm_for_cpu` and int8 to `_weight_int8pack_mm` (per-channel scales), both with bf16
activations, and the output layer to fp16 weights whose largest logits are recomputed in fp32
(`ExactTopLogits`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.nn import quant_int
from lmlab.nn import quant_kernels as kernels
from lmlab.nn.attention import Attention
from lmlab.nn.quant_formats import Unpacked

PRECISIONS = ("fp32", "bf16", "int8", "int4", "gguf", "gguf-exact", "gguf-q8")
# GGUF files: their block-quantized matrices kept exactly as stored (lmlab/io/gguf/read.py, blocks=True).
# They differ in decoding's activations only (lmlab/nn/quant_int.py): "gguf" on two int8 planes where the
# CPU has VNNI (else fp32), "gguf-exact" fp32 always, "gguf-q8" one int8 plane as llama.cpp computes.
DEFAULT_PRECISION = "gguf"
GGUF_ACTIVATIONS = {"gguf-exact": "fp32", "gguf-q8": "int8"}
INT4_GROUP = 32  # inputs per scale/offset; GGUF Q4_0/Q4_1 block size (ggml-common.h QK4_0)
# Up to this many rows per call (decoding, small batches) the block kernels run; more rows (prefill)
# make the matmul compute-bound, where a dense matmul on weights dequantized on the fly is faster.
KERNEL_ROWS = 4


def _flat_matmul(op, x: torch.Tensor, dtype: torch.dtype, *args) -> torch.Tensor:
    """Apply a 2-D kernel `op(x2d, *args) -> [M, N]` computing in `dtype` to x of any leading shape
    and dtype; the result comes back in x's dtype."""
    y = op(x.reshape(-1, x.shape[-1]).to(dtype), *args)
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (positive, float32) rounded up to a value `dtype` holds exactly: a scale stored in bf16
    would otherwise be off by up to 2^-8 of itself, shifting every weight of its row or group."""
    y = x.to(dtype).float()
    bumped = torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
    return torch.where(y < x, bumped, y)


class HalfLinear(nn.Module):
    """y = x W^T (+ b) with W kept in a 16-bit float `dtype` (bf16 or fp16) and the matmul run in it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return (self.weight if rows is None else self.weight[rows]).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class HalfEmbedding(nn.Module):
    """An embedding table kept in a 16-bit float `dtype`, looked up in float32."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.register_buffer("table", weight.detach().to(dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).float()


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 and one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        scale = _round_up(w.abs().amax(dim=1).clamp(min=1e-12) / 127, dtype)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or its `rows`) as the kernel sees it, in float32."""
        if rows is None:
            return self.qweight.float() * self.scale.float()[:, None]
        return self.qweight[rows].float() * self.scale[rows].float()[..., None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _flat_matmul(torch.ops.aten._weight_int8pack_mm, x, self.scale.dtype, self.qweight, self.scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _blocks(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    if k % group:
        raise ValueError(f"in_features={k} is not a multiple of the group size {group}")
    return w.detach().float().view(n, k // group, group)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """GGUF stores block scales and offsets in fp16; so do we (a Q4_1 block's d, m come back exactly)."""
    fmax = torch.finfo(torch.float16).max
    return x.clamp(-fmax, fmax).half()


def _codes(num: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(num / step) clamped to [lo, hi]; 0 where the step is 0 (a constant block)."""
    q = torch.round(num / torch.where(step > 0, step, 1.0)[..., None]).clamp(lo, hi)
    return torch.where(step[..., None] > 0, q, 0.0)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in 4 bits: w = d q + m per group of 32 inputs, q in 0..15 (GGUF's Q4_1).

    Stored as Q4_1 blocks (lmlab/nn/quant_kernels.py): `qs` [n, k/2] (byte j of a group holds q_j and
    q_{j+16}) and `dm` [n, k/32, 2] (d, m in fp16). A few rows (decoding) go through the exact kernel
    with fp32 activations; many rows (prefill) through a dense matmul in `dtype` (bf16: ~2x faster
    than fp32, which is exact) on weights dequantized on the fly. Without the kernels, PyTorch's
    tinygemm layout (w = (q - 8) d + zero, zero = m + 8 d) with bf16 scales and activations serves
    every call.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 group: int = INT4_GROUP):
        super().__init__()
        if group != kernels.BLOCK:
            raise ValueError(f"int4: groups of {kernels.BLOCK} inputs only, got {group}")
        w = _blocks(weight, group)
        n, g, _ = w.shape
        # m = min and d = (max - min) / 15 in fp16, as Q4_1 stores them, and the codes on that stored
        # grid: a Q4_1 weight (w = d q + m) gets its own d, m and q back
        lo = _fp16(w.amin(dim=-1))
        d = _fp16((w.amax(dim=-1) - lo.float()) / 15)
        q = _codes(w - lo.float()[..., None], d.float(), 0, 15).to(torch.uint8)
        self.register_buffer("qs", (q[..., :16] | (q[..., 16:] << 4)).view(n, g * 16))
        self.register_buffer("dm", torch.stack([d, lo], dim=-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("packed", None)
        self.register_buffer("scales_zeros", None)
        if not kernels.available():
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, -1).int(), 1)
            d32, lo32 = d.float(), lo.float()  # [k / group, n, 2]: the kernel's scales-and-zeros layout
            self.scales_zeros = torch.stack([d32, lo32 + 8 * d32], dim=-1).transpose(0, 1).contiguous().bfloat16()
        self.dtype, self.group, self.in_features, self.out_features = dtype, group, g * group, n

    @classmethod
    def from_codes(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """From 4-bit codes [n, k] (0..15) and (d, m) [n, k/32] as stored (fp16 for Q4_1, float32 for Q4_0's
        m = -8 d and Q4_K's sub-block scales): w = d q + m, no re-quantization."""
        if not kernels.available():
            raise LmlabError("4-bit GGUF blocks need lmlab's kernels (numba; LMLAB_NO_KERNELS unset)")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        n, k = codes.shape
        q = codes.view(n, k // kernels.BLOCK, kernels.BLOCK).to(torch.uint8)
        self.register_buffer("qs", (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2))
        self.register_buffer("dm", torch.stack([d, m], dim=-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("packed", None)
        self.register_buffer("scales_zeros", None)
        self.dtype, self.group, self.in_features, self.out_features = dtype, kernels.BLOCK, k, n
        return self

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or its `rows`) the exact kernel multiplies by, in float32 ([n, k])."""
        qs, dm = (self.qs, self.dm) if rows is None else (self.qs[rows], self.dm[rows])
        qs = kernels.flat_codes(qs)
        n, g, _ = dm.shape
        b = qs.reshape(n, g, 16)
        q = torch.cat([b & 15, b >> 4], dim=-1).float()
        dm = dm.float()
        return torch.addcmul(dm[..., 1:], dm[..., :1], q).reshape(n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).bfloat16(), self.packed,
                                                           self.group, self.scales_zeros)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif x.numel() <= KERNEL_ROWS * self.in_features:  # decoding: the exact kernel, fp32 in and out
            y = kernels.q4_1_matmul(x.float().contiguous(), self.qs, self.dm).to(x.dtype)
        elif _block_major_fp32(self):
            y = _block_major_forward(self, x)
        else:
            y = F.linear(x.to(self.dtype), kernels.q4_1_dequantize(self.qs, self.dm, self.dtype)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:  # the MLP's fused gate-and-up path
        return _swiglu(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bias={self.bias is not None}, exact_kernel={self.packed is None}")


class Q8Linear(nn.Module):
    """y = x W^T (+ b) with W in 8 bits: w = d q per group of 32 inputs, |q| <= 127 (GGUF's Q8_0, whose
    weights come back exactly: d = absmax / 127 in fp16). Needs the kernels
    (lmlab/nn/quant_kernels.py): a few rows go through the exact kernel, many through dense `dtype`
    weights made `chunk` rows at a time (fp32: exact; bf16 would round logits near 27 by up to 0.06)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 chunk: int = 8192):
        super().__init__()
        w = _blocks(weight, kernels.BLOCK)
        n, g, _ = w.shape
        d = _fp16(w.abs().amax(dim=-1) / 127)
        self.register_buffer("qs", _codes(w, d.float(), -127, 127).to(torch.int8).view(n, -1))
        self.register_buffer("d", d)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.dtype, self.chunk, self.in_features, self.out_features = dtype, chunk, g * kernels.BLOCK, n

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        qs, d = (self.qs, self.d) if rows is None else (self.qs[rows], self.d[rows])
        qs = kernels.flat_codes(qs)
        return (qs.float().reshape(*d.shape, kernels.BLOCK) * d.float()[..., None]).view(*qs.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= KERNEL_ROWS * self.in_features:
            y = kernels.q8_0_matmul(x.float().contiguous(), self.qs, self.d)
        else:
            x2 = x.reshape(-1, self.in_features).to(self.dtype)
            y = torch.empty(x2.shape[0], self.out_features, dtype=self.dtype)
            for i in range(0, self.out_features, self.chunk):
                w = kernels.q8_0_dequantize(self.qs[i:i + self.chunk], self.d[i:i + self.chunk], self.dtype)
                torch.mm(x2, w.T, out=y[:, i:i + self.chunk])
            y = y.view(*x.shape[:-1], self.out_features)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Q8Embedding(nn.Module):
    """An embedding table in Q8_0 blocks (shared with a tied `Q8Linear` output layer), looked up exactly
    in float32."""

    def __init__(self, table: Q8Linear):
        super().__init__()
        self.register_buffer("qs", table.qs)
        self.register_buffer("d", table.d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qs[ids].float().reshape(*ids.shape, -1, kernels.BLOCK) * self.d[ids].float()[..., None]
        return rows.view(*ids.shape, -1)


class GroupLinear(nn.Module):
    """y = x W^T (+ b) with W as integer codes and one float32 scale (and offset) per group of inputs,
    w = d q + m: the layout GGUF's Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 unpack to (lmlab/nn/quant_formats.py),
    so a file's weights are multiplied exactly as stored. `qs` [n, k] int8, `d`, `m` [n, k / group]
    (m None: no offsets). A few rows go through the exact kernel; many (prefill) through dense `dtype`
    weights made `chunk` rows at a time, one layer's worth of memory at most."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, chunk: int = 8192):
        super().__init__()
        n, k = qs.shape
        if k % d.shape[1] or d.shape[0] != n or (m is not None and m.shape != d.shape):
            raise ValueError(f"group scales {tuple(d.shape)} do not fit codes {tuple(qs.shape)}")
        self.register_buffer("qs", qs.to(torch.int8))
        # fp16 scales (GGUF's Q8_0, Q5_0, Q5_1) stay fp16: exact, and half the bytes to stream
        half = d.dtype == torch.float16 and (m is None or m.dtype == torch.float16)
        self.register_buffer("d", d if half else d.float())
        self.register_buffer("m", None if m is None else m if half else m.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.group, self.dtype, self.chunk = k // d.shape[1], dtype, chunk
        self.in_features, self.out_features = k, n

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        qs, d, m = (self.qs, self.d, self.m) if rows is None else \
            (self.qs[rows], self.d[rows], None if self.m is None else self.m[rows])
        qs = kernels.flat_codes(qs)
        w = qs.float().reshape(*d.shape, self.group) * d.float()[..., None]
        return (w if m is None else w + m.float()[..., None]).view(*qs.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= KERNEL_ROWS * self.in_features and kernels.available():
            y = kernels.group_matmul(x.float().contiguous(), self.qs, self.d, self.m)
        elif _block_major_fp32(self):
            y = _block_major_forward(self, x)
        else:
            x2 = x.reshape(-1, self.in_features).to(self.dtype)
            y = torch.empty(x2.shape[0], self.out_features, dtype=self.dtype)
            for i in range(0, self.out_features, self.chunk):
                w = self.dequantized_weight(torch.arange(i, min(i + self.chunk, self.out_features)))
                torch.mm(x2, w.to(self.dtype).T, out=y[:, i:i + self.chunk])
            y = y.view(*x.shape[:-1], self.out_features)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:  # the MLP's fused gate-and-up path
        return _swiglu(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"offsets={self.m is not None}, bias={self.bias is not None}")


def _block_major_fp32(m: nn.Module) -> bool:
    return m.dtype == torch.float32 and kernels.available() and kernels.block_major(m.qs)


def _block_major_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Many rows (prefill, scoring) through codes stored block-major (GGUF layers): the exact fp32 weights
    made a chunk at a time into one reused buffer, then fp32 GEMMs (`kernels.block_major_mm`)."""
    y = kernels.block_major_mm(x.reshape(-1, m.in_features).float().contiguous(), block_args(m))
    return y.view(*x.shape[:-1], m.out_features)


def _swiglu(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate-and-up projection `m` (lmlab's MLP layout: W = [Wg; Wu]), without
    autograd (the MLP asks for it under no_grad only). Many rows on block-major codes go through
    `kernels.block_major_swiglu` (silu and the product fused into the GEMMs); else the module's output,
    split."""
    if (x.numel() > KERNEL_ROWS * m.in_features and m.bias is None and _block_major_fp32(m)
            and m.out_features % 2 == 0):
        y = kernels.block_major_swiglu(x.reshape(-1, m.in_features).float().contiguous(), block_args(m))
        return y.view(*x.shape[:-1], m.out_features // 2).to(x.dtype)
    gate, up = m(x).chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class BlockEmbedding(nn.Module):
    """An embedding table kept in a quantized linear's blocks (`Int4Linear` or `GroupLinear`, possibly
    the tied output layer), each looked-up row dequantized exactly in float32."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.dequantized_weight(ids.reshape(-1)).view(*ids.shape, -1)


def linear_from_blocks(parts: list[Unpacked], bias: torch.Tensor | None = None,
                       prefill_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`_linear_from_blocks` with its codes stored block-major (`kernels.block_major`): the layout decoding
    reads, made here, one tensor at a time, rather than for the whole model when decoding starts."""
    layer = _linear_from_blocks(parts, bias, prefill_dtype)
    layer.qs = kernels.to_block_major(layer.qs)
    return layer


def _linear_from_blocks(parts: list[Unpacked], bias: torch.Tensor | None = None,
                        prefill_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """One linear layer whose weight is `parts` (GGUF tensors unpacked by lmlab/nn/quant_formats.py)
    stacked by rows, e.g. q, k, v into our fused projection, without re-quantizing: 4-bit codes in
    groups of 32 (Q4_0, Q4_1, Q4_K) as `Int4Linear`, anything else (or a mix, e.g. Q4_K_M's Q4_K q/k
    with a Q6_K v) as `GroupLinear` at the finest group size among them."""
    def cat(arrays: list[np.ndarray]) -> torch.Tensor:  # one part: no copy
        return torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))

    if all(p.codes.dtype == np.uint8 and p.group == kernels.BLOCK and p.m is not None for p in parts):
        d, m = (cat([getattr(p, a) for p in parts]) for a in ("d", "m"))
        if torch.equal(d.half().float(), d) and torch.equal(m.half().float(), m):
            d, m = d.half(), m.half()  # Q4_1's own fp16 scales: half the memory, the same values
        return Int4Linear.from_codes(cat([p.codes for p in parts]), d, m, bias, dtype=prefill_dtype)
    g = min(p.group for p in parts)
    if any(p.group % g for p in parts):
        raise ValueError(f"group sizes {[p.group for p in parts]} do not nest")

    def spread(a: np.ndarray, p: Unpacked) -> np.ndarray:  # a group's scale over its g-sized subgroups
        return np.repeat(a, p.group // g, axis=1)

    qs = cat([p.codes.astype(np.int8, copy=False) for p in parts])
    d = cat([spread(p.d, p) for p in parts])
    m = None
    if any(p.m is not None for p in parts):
        m = cat([spread(p.m if p.m is not None else np.zeros_like(p.d), p) for p in parts])
    if torch.equal(d.half().float(), d) and (m is None or torch.equal(m.half().float(), m)):
        d, m = d.half(), None if m is None else m.half()  # fp16 as stored (Q8_0, Q5_0/1): the same values
    return GroupLinear(qs, d, m, bias, dtype=torch.float32 if prefill_dtype == torch.float32 else prefill_dtype)


def block_args(m: nn.Module) -> tuple:
    """(kind, qt, s1, s2): a quantized linear's weights as the block-major kernels take them
    (`kernels.linear_args`), made once per module and kept (quantized modules are inference-only),
    keyed by the codes' storage and version. With codes stored block-major (`kernels.block_major`) qt
    is a view of them; the module's scales become views of the kernels' copies, so one set is kept."""
    key = (m.qs.data_ptr(), m.qs._version)
    hit = m.__dict__.get("_decode_pack")
    if hit is None or hit[0] != key:
        if isinstance(m, GroupLinear):
            args = kernels.linear_args(m.qs, m.d, m.m, group=True)
        else:
            args = kernels.linear_args(m.qs, m.dm if isinstance(m, Int4Linear) else m.d)
        hit = m.__dict__["_decode_pack"] = (key, _share_scales(m, args))
    return hit[1]


def pack_block_args(model: nn.Module) -> None:
    """Make `block_args` of every block-major linear now (at load), not at the first forward: repacking
    the scales frees the loaded ones, which in the middle of the heap would stay resident through that
    forward (+30-40 MB at the first prefill of SmolLM2 Q4_K_M)."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, GroupLinear)) and kernels.available() and kernels.block_major(m.qs):
            block_args(m)


def _share_scales(m: nn.Module, args: tuple) -> tuple:
    """Point the module's scales at the decoding kernels' block-major copies in `args` (the same values,
    in the same dtype: fp16 as the file stores Q4_1's and Q8_0's, else float32), so that one set of scales
    is kept, not two; returns `args`."""
    half = args[0] >= kernels.HALF

    def tensor(b: np.ndarray) -> torch.Tensor:  # the kernels' scale bytes [k/g, n * size] as a [k/g, n] view
        return torch.from_numpy(b.view(np.uint16)).view(torch.float16) if half else torch.from_numpy(b.view(np.float32))

    if isinstance(m, Int4Linear):
        both = torch.stack([tensor(args[2]), tensor(args[3])])  # [2, k/32, n]: d, m
        m.dm = both.permute(2, 1, 0)  # [n, k/32, 2], a view of the same memory
        return (args[0], args[1], both[0].numpy().view(np.uint8), both[1].numpy().view(np.uint8))
    if isinstance(m, (GroupLinear, Q8Linear)):
        m.d = tensor(args[2]).T
        if getattr(m, "m", None) is not None:
            m.m = tensor(args[3]).T
    return args


class FastRMSNorm(nn.Module):
    """`nn.RMSNorm` for float32 inference through the kernels: one call instead of PyTorch's ~6 ops,
    which at one row per call (decoding) cost ~30 us each, 60 times per token on SmolLM2-135M."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        dim = norm.normalized_shape[-1]
        if len(norm.normalized_shape) != 1:
            raise ValueError("FastRMSNorm normalises over the last dimension only")
        w = norm.weight if norm.weight is not None else torch.ones(dim)
        # a parameter, as in nn.RMSNorm: callers find a model's device from its parameters
        self.weight = nn.Parameter(w.detach().float().contiguous(), requires_grad=False)
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        return kernels.rms_norm(x.contiguous(), self.weight, self.eps)


class ExactTopLogits(nn.Module):
    """The output layer: all logits from a fast 16-bit kernel, then its `k` largest recomputed in fp32
    from the same stored weights. A bf16 result holds 8 significant bits, so a logit near 27 (typical
    of a confident SmolLM2 prediction) is off by up to 0.06, enough to swap the two best tokens at ~3%
    of positions; fp16 (11 bits) is off by up to 0.008. Recomputing the top `k` makes the choice among
    them, and their probabilities, exact for the stored weights."""

    def __init__(self, linear: nn.Module, k: int = 16):
        super().__init__()
        self.linear, self.k = linear, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.float())
        top = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices  # [..., k]
        exact = (self.linear.dequantized_weight(top) @ x.float()[..., None]).squeeze(-1)
        if self.linear.bias is not None:
            exact = exact + self.linear.bias[top].float()
        return logits.scatter(-1, top, exact)


@torch.no_grad()
def quantized_linear(m: nn.Linear, precision: str, *, prefill_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`m` as a frozen layer in `precision` (bf16 | int8 | int4): int4 as Q4_1 blocks where its inputs come
    in groups of 32, else 8 bits (Q8_0 blocks with the kernels, one scale per row without)."""
    fits = m.weight.shape[1] % kernels.BLOCK == 0
    if precision == "bf16":
        return HalfLinear(m.weight, m.bias)
    if precision == "int4" and fits:
        return Int4Linear(m.weight, m.bias, dtype=prefill_dtype)
    if precision not in ("int8", "int4"):
        raise LmlabError(f"unknown low precision '{precision}' (bf16 | int8 | int4)")
    if kernels.available() and fits:
        return Q8Linear(m.weight, m.bias, dtype=prefill_dtype)
    return Int8Linear(m.weight, m.bias)


def _swap(model: nn.Module, kind: type[nn.Module], make) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(name, child))


@torch.no_grad()
def quantize_(model: nn.Module, precision: str, *, head: str = "lm_head",
              prefill_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Convert `model` in place to `precision` (one of PRECISIONS) for inference, and return it.
    `head` names the output layer (exact 8-bit blocks, or fp16 with exact top logits, in every low
    precision); `prefill_dtype` is that of int8/int4's dense matmuls over many rows (torch.float32:
    exact). Not reversible; training a converted model is not supported."""
    if precision not in PRECISIONS:
        raise LmlabError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return model.float()
    _float_except_blocks(model)  # what stays (norms, biases elsewhere) computes in fp32
    blocks = kernels.available()
    if precision.startswith("gguf"):
        # FastDecoder (lmlab/generate/fast_decode.py) reads this; prefill and scoring stay fp32
        model.decode_activations = GGUF_ACTIVATIONS.get(precision) or quant_int.default_mode()
        return _decoding_kernels(model, blocks).eval()
    heads: dict[int, nn.Module] = {}  # id(fp32 weight) -> output layer, to share with a tied embedding

    def fits(m: nn.Module) -> bool:
        return m.weight.shape[1] % kernels.BLOCK == 0

    def linear(name: str, m: nn.Linear) -> nn.Module:
        if name == head:
            if blocks and fits(m):  # a GGUF Q8_0 table comes back exactly; logits in fp32
                heads[id(m.weight)] = Q8Linear(m.weight, m.bias)
                return heads[id(m.weight)]
            # fp16: 3 more significant bits than bf16, and its gemv runs ~2x faster here
            heads[id(m.weight)] = HalfLinear(m.weight, m.bias, dtype=torch.float16)
            return ExactTopLogits(heads[id(m.weight)])
        return quantized_linear(m, precision, prefill_dtype=prefill_dtype)

    def embedding(name: str, m: nn.Embedding) -> nn.Module:
        tied = heads.get(id(m.weight))
        if isinstance(tied, Q8Linear):
            return Q8Embedding(tied)
        if blocks and fits(m):
            return Q8Embedding(Q8Linear(m.weight))
        out = HalfEmbedding(m.weight[:0] if tied is not None else m.weight)
        if tied is not None:  # tied to the output layer: one fp16 table for both
            out.table = tied.weight
        return out

    _swap(model, nn.Linear, linear)
    _swap(model, nn.Embedding, embedding)
    return _decoding_kernels(model, blocks).eval()


def _float_except_blocks(model: nn.Module) -> None:
    """`model.float()`, leaving the block-quantized layers a GGUF file was loaded into as they are: their
    fp16 scales are exact as stored, and float32 copies would double their memory."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, Q8Linear, GroupLinear, Q8Embedding)):
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                m._buffers[name] = b.float()


def _decoding_kernels(model: nn.Module, blocks: bool) -> nn.Module:
    """Decoding's small ops (RMSNorm, one query's attention) as one kernel call each, where they run."""
    if blocks:
        _swap(model, nn.RMSNorm, lambda name, m: FastRMSNorm(m) if len(m.normalized_shape) == 1 else m)
        for m in model.modules():
            if isinstance(m, Attention):
                m.sdpa = kernels.sdpa
    return model
