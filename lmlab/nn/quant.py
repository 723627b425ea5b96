"""Inference precisions for a trained model, applied from outside it: `quantize_(model, "int4")`.

- `fp32`: as trained or imported (the reference).
- `bf16`: weights in bfloat16, matmuls in bf16 (CPUs with AVX512-BF16/AMX run them several times
  faster than fp32).
- `int8`: weight-only int8, one scale per output channel (absmax / 127); PyTorch's
  `_weight_int8pack_mm` kernel dequantizes on the fly.
- `int4`: weight-only 4-bit, asymmetric, one scale and offset per group of 32 inputs (the block size
  of GGUF's Q4_0/Q4_1, so a Q4_1 weight gets its own 4-bit code back), with PyTorch's CPU kernel
  `_weight_int4pack_mm_for_cpu`.

In every low precision the output layer keeps fp16 weights (shared with a tied embedding) and its
largest logits are recomputed in fp32 (`ExactTopLogits`); the other linears cast their input to
bf16 and their output back, so the residual stream, norms, attention and KV cache stay fp32. On
SmolLM2-135M (benchmarks/llm_inference.py) a model run wholly in bf16 flips the top-1 token at ~3%
of positions against fp32 (mean KL 1.3e-3): most of it is the bf16 rounding of the logits
themselves and of the residual stream, not of the matmul inputs.

Decoding a token reads every weight once, so on a CPU it is bound by memory bandwidth and fewer
bytes per weight is faster; prefill is bound by compute, where bf16 matmuls win.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError

PRECISIONS = ("fp32", "bf16", "int8", "int4")
DEFAULT_PRECISION = "int4"  # the fastest decode here; Q4_1 weights map onto its grid (benchmarks/llm_inference.py)
INT4_GROUP = 32  # inputs per scale/offset; GGUF Q4_0/Q4_1 block size (ggml-common.h QK4_0)


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


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in 4 bits: w = q * scale + min per group of `group` inputs, q in 0..15.

    PyTorch's tinygemm layout stores (scale, zero) with w = (q - 8) * scale + zero, so zero = min + 8 scale.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 group: int = INT4_GROUP):
        super().__init__()
        n, k = weight.shape
        if k % group:
            raise ValueError(f"int4: in_features={k} is not a multiple of the group size {group}")
        w = weight.detach().float().view(n, k // group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        # q on the float32 grid: a Q4_1 weight (x = d q + m) gets its own q back. Storing scale and
        # zero in bf16 then moves each weight by at most ~3% of a step, where snapping to a grid
        # rounded to bf16 first would move some by half a step.
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [k / group, n, 2]: the kernel's scales-and-zeros layout
        sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", sz.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.group, self.in_features, self.out_features = group, k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _flat_matmul(torch.ops.aten._weight_int4pack_mm_for_cpu, x, self.scales_zeros.dtype, self.qweight,
                         self.group, self.scales_zeros)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bias={self.bias is not None}")


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


def _swap(model: nn.Module, kind: type[nn.Module], make) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(name, child))


@torch.no_grad()
def quantize_(model: nn.Module, precision: str, *, head: str = "lm_head") -> nn.Module:
    """Convert `model` in place to `precision` (one of PRECISIONS) for inference, and return it.
    `head` names the output layer (fp16 with exact top logits in every low precision). Not
    reversible; training a converted model is not supported."""
    if precision not in PRECISIONS:
        raise LmlabError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return model.float()
    model.float()  # what stays (norms, biases elsewhere) computes in fp32
    halves: dict[int, HalfLinear] = {}  # id(fp32 weight) -> output layer, to share with a tied embedding

    def linear(name: str, m: nn.Linear) -> nn.Module:
        if name == head:  # fp16: 3 more significant bits than bf16, and its gemv runs ~2x faster here
            halves[id(m.weight)] = HalfLinear(m.weight, m.bias, dtype=torch.float16)
            return ExactTopLogits(halves[id(m.weight)])
        if precision == "bf16":
            return HalfLinear(m.weight, m.bias)
        if precision == "int4" and m.in_features % INT4_GROUP == 0:
            return Int4Linear(m.weight, m.bias)
        return Int8Linear(m.weight, m.bias)

    def embedding(name: str, m: nn.Embedding) -> nn.Module:
        if id(m.weight) not in halves:
            return HalfEmbedding(m.weight)
        out = HalfEmbedding(m.weight[:0])  # tied to the output layer: one fp16 table for both
        out.table = halves[id(m.weight)].weight
        return out

    _swap(model, nn.Linear, linear)
    _swap(model, nn.Embedding, embedding)
    return model.eval()
