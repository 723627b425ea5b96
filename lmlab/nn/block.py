"""The Transformer block: pre-norm x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Llama), or with
`post_norm` the original arrangement norm(x + attn(x)), then norm(x + mlp(x)) (Vaswani et al. 2017;
BERT, BART). With `cross_attention` (an encoder-decoder's decoder) a cross-attention sub-layer over
the encoder's output sits between the two: its keys/values come in as `cross_kv`, computed once.
With `moe` the feed-forward is a Mixture of Experts (lmlab/nn/moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.nn.attention import Attention
from lmlab.nn.mlp import MLP
from lmlab.nn.moe import MoE, MoEConfig
from lmlab.nn.norm import make_norm


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, *, n_kv_head: int | None = None, mlp_hidden: int | None = None,
                 activation: str = "gelu_tanh", norm: str = "layernorm", norm_eps: float = 1e-5,
                 bias: bool = True, dropout: float = 0.0, causal: bool = True, post_norm: bool = False,
                 cross_attention: bool = False, attention: dict | None = None, moe: MoEConfig | None = None,
                 attn_dropout: float | None = None):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = make_norm(norm, n_embd, norm_eps, bias)
        # `attention`: the self-attention's backend options (backend, window, n_global)
        # `attn_dropout`: on the attention probabilities (None: `dropout`); `dropout` on every residual branch
        p_attn = dropout if attn_dropout is None else attn_dropout
        self.attn = Attention(n_embd, n_head, n_kv_head, bias=bias, dropout=p_attn, causal=causal, **(attention or {}))
        if cross_attention:
            self.norm_cross = make_norm(norm, n_embd, norm_eps, bias)
            self.cross = Attention(n_embd, n_head, n_kv_head, bias=bias, dropout=p_attn, causal=False)
        self.norm2 = make_norm(norm, n_embd, norm_eps, bias)
        hidden = mlp_hidden or 4 * n_embd
        self.mlp = (MoE(n_embd, moe.moe_hidden or hidden, activation, moe, dropout=dropout) if moe is not None
                    else MLP(n_embd, hidden, activation, bias, dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cross_mask: torch.Tensor | None = None, **attn_kwargs) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, **attn_kwargs)))
            if cross_kv is not None:
                x = self.norm_cross(x + self.drop(self.cross(x, cross_kv=cross_kv, attn_mask=cross_mask)))
            return self.norm2(x + self.mlp(x))
        x = _residual(x, self.drop(self.attn(self.norm1(x), **attn_kwargs)))
        if cross_kv is not None:
            x = _residual(x, self.drop(self.cross(self.norm_cross(x), cross_kv=cross_kv, attn_mask=cross_mask)))
        return _residual(x, self.mlp(self.norm2(x)))


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y for a sub-layer's fresh output y, added in place into y (or its copy in x's dtype): under
    autocast x is float32 and y bf16, and `x + y` would allocate both the float32 copy of y and the sum."""
    return y.to(x.dtype).add_(x)
