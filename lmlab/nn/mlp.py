"""Position-wise feed-forward networks: GELU (GPT-2, BERT) and SwiGLU (Shazeer 2020; Llama)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.device_paths import cpu_kernels

# GPT-2's "gelu_new": 0.5 x (1 + tanh(c (x + a x^3))), c = sqrt(2 / pi), a = 0.044715 (Hendrycks & Gimpel
# 2016, sec. 2), the tanh approximation of x * Phi(x)
_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715
# elements per chunk of `_GeluTanh`: its float32 temporaries (512 KiB each) stay in the cache
_GELU_CHUNK = 1 << 17


def _gelu_tanh_chunk(x: torch.Tensor, y: torch.Tensor, dy_dx: torch.Tensor) -> None:
    """y = gelu_tanh(x) and dy/dx, computed in float32 (or wider) and rounded once into y and dy_dx.
    As (1 + tanh z) / 2 = sigmoid(2z): y = x s with s = sigmoid(2c (x + a x^3)), and
    dy/dx = s + x s (1 - s) 2c (1 + 3 a x^2)."""
    u = x.to(torch.promote_types(x.dtype, torch.float32), copy=True)
    inner = torch.addcmul(torch.full((), 2 * _GELU_C, dtype=u.dtype, device=x.device), u, u,
                          value=2 * _GELU_C * _GELU_A)  # 2c (1 + a x^2)
    s = (inner * u).sigmoid_()
    u.mul_(s)  # y, in float32
    y.copy_(u)
    slope = torch.addcmul(u, u, s, value=-1)  # x s (1 - s)
    torch.addcmul(s, slope, inner.mul_(3).sub_(4 * _GELU_C), out=dy_dx)  # 3 inner - 4c = 2c (1 + 3 a x^2)


class _GeluTanh(torch.autograd.Function):
    """gelu_tanh for training: the forward pass also computes the derivative (a few more element-wise
    operations on values already in the cache) and keeps it, in x's dtype, instead of x, so the
    backward pass is one product. In chunks, and through sigmoid, not tanh (slower than sigmoid in
    PyTorch's CPU kernels): forward and backward take half the time of F.gelu's and its backward
    kernel in bf16 on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y, dy_dx = torch.empty_like(x), torch.empty_like(x)
        xs, ys, ds = x.view(-1), y.view(-1), dy_dx.view(-1)
        for i in range(0, xs.numel(), _GELU_CHUNK):
            j = i + _GELU_CHUNK
            _gelu_tanh_chunk(xs[i:j], ys[i:j], ds[i:j])
        ctx.save_for_backward(dy_dx)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (dy_dx,) = ctx.saved_tensors
        return grad_y * dy_dx


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU; `_GeluTanh` when a gradient is wanted on a CPU (lmlab/nn/device_paths.py), torch's
    kernel otherwise."""
    if torch.is_grad_enabled() and x.requires_grad and cpu_kernels(x):
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": gelu_tanh,  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, activation: str = "gelu_tanh", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.gated = activation == "swiglu"
        act = "silu" if self.gated else activation
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}' ({', '.join([*ACTIVATIONS, 'swiglu'])})")
        self.act = ACTIVATIONS[act]
        self.up = nn.Linear(n_embd, hidden * (2 if self.gated else 1), bias=bias)
        self.down = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.drop(self.down(self.act(self.up(x))))
        if not torch.is_grad_enabled():
            # a quantized projection may compute silu(gate) * up itself (lmlab/nn/quant.py `_swiglu`);
            # else in place: a prefill's temporaries are MBs per layer
            fused = getattr(self.up, "swiglu", None)
            if fused is not None:
                return self.drop(self.down(fused(x)))
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.drop(self.down(self.act(gate).mul_(up)))
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.drop(self.down(self.act(gate) * up))
