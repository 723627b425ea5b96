"""The pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.nn.attention import Attention
from lmlab.nn.mlp import MLP
from lmlab.nn.norm import make_norm


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, *, n_kv_head: int | None = None, mlp_hidden: int | None = None,
                 activation: str = "gelu_tanh", norm: str = "layernorm", norm_eps: float = 1e-5,
                 bias: bool = True, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.norm1 = make_norm(norm, n_embd, norm_eps, bias)
        self.attn = Attention(n_embd, n_head, n_kv_head, bias=bias, dropout=dropout, causal=causal)
        self.norm2 = make_norm(norm, n_embd, norm_eps, bias)
        self.mlp = MLP(n_embd, mlp_hidden or 4 * n_embd, activation, bias, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), **attn_kwargs))
        return x + self.mlp(self.norm2(x))
