"""One attention module: multi-head or grouped-query, causal or bidirectional, with a KV cache.

The projection of queries, keys and values is a single fused matmul (n_head + 2 * n_kv_head heads),
and the attention itself is `scaled_dot_product_attention`, which picks a fused kernel where one
exists, except when training in bf16 on CPU, where plain batched matmuls are faster
(`causal_matmul_attention`). Position information other than additive embeddings (e.g. RoPE)
enters through `rotary`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.kv_cache import KVCache

# SDPA shares each key/value head among n_head / n_kv_head query heads itself since PyTorch 2.5,
# without the copies repeat_interleave makes (half the time of a decode step's attention on CPU)
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    # the self-attention kernel; inference conversions may swap in another per module (lmlab/nn/quant.py)
    sdpa = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, *, bias: bool = True,
                 dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        if n_embd % n_head or n_head % self.n_kv_head:
            raise ValueError(f"n_embd={n_embd}, n_head={n_head}, n_kv_head={self.n_kv_head} do not divide")
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, (n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, n_embd, bias=bias)

    def _project(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Part of the fused projection: the query rows or the key/value rows of `qkv`."""
        b = self.qkv.bias[rows] if self.qkv.bias is not None else None
        return F.linear(x, self.qkv.weight[rows], b)

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ([B, n_kv_head, S, head_dim]) of cross-attention over `memory` (e.g. an
        encoder's output): computed once per input and passed to every decoding step as `cross_kv`."""
        B, S, _ = memory.shape
        hd, nkv = self.head_dim, self.n_kv_head
        k, v = self._project(memory, slice(self.n_head * hd, None)).split([nkv * hd, nkv * hd], dim=-1)
        return k.view(B, S, nkv, hd).transpose(1, 2), v.view(B, S, nkv, hd).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, kv_cache: KVCache | None = None, layer_idx: int = 0,
                rotary: Callable[[torch.Tensor], torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention over `x`, or with `cross_kv` (from `cross_kv(memory)`) cross-attention:
        queries from `x`, keys/values fixed (no cache, no causality, no rotary)."""
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        if cross_kv is not None:
            q = self._project(x, slice(0, nh * hd)).view(B, T, nh, hd).transpose(1, 2)
            k, v = cross_kv
            if nkv != nh:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.proj(y.transpose(1, 2).reshape(B, T, nh * hd))
        # all heads at once: [B, n_head + 2 n_kv_head, T, hd]; queries and keys rotate in one call
        heads = self.qkv(x).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)
        qk, v = heads[:, :nh + nkv], heads[:, nh + nkv:]
        if rotary is not None:
            qk = rotary(qk)
        q, k = qk[:, :nh], qk[:, nh:]
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.append(layer_idx, k, v)
        gqa = nkv != nh
        if gqa and not _SDPA_GQA:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            gqa = False
        is_causal = False
        mask = attn_mask
        if self.causal and T > 1:
            if past == 0 and mask is None:
                is_causal = True
            else:  # query i (absolute position past + i) sees keys 0 .. past + i
                S = k.shape[2]
                causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                mask = causal if mask is None else (mask & causal)
        dropout_p = self.dropout if self.training else 0.0
        if is_causal and not gqa and dropout_p == 0.0 and _matmul_attention_wins(q, k):
            y = causal_matmul_attention(q, k, v)
        else:
            y = self.sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                          **({"enable_gqa": True} if gqa else {}))
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.proj(y)


def _matmul_attention_wins(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `causal_matmul_attention` beats SDPA here: when training in bf16 on CPU. There the
    fused kernel's backward pass is slow (2x slower at T=256, 1.2x at T=1024 on AVX-512-bf16; in
    float32 SDPA is the faster one), while batched bf16 matmuls run near the matmul peak. The full
    score matrix is kept for the backward pass, so only while that is small."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
            and B * H * T * k.shape[2] <= _MATMUL_ATTENTION_MAX_SCORES)


_MATMUL_ATTENTION_MAX_SCORES = 2**25  # 64 MiB of bf16 scores per layer


class _MatmulAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) v with float32 scores and soft-max, the other products (and
    the whole backward pass) in the dtype of q. With scores rounded to bf16 (off by up to 2^-9 of
    their size before the exponential) a 300-step bf16 run ended 1.2% above its fp32 twin in val
    loss; with float32 scores 0.5% (SDPA, float32 inside throughout: 0.2%)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
        probs = torch.softmax(scores.add_(bias), dim=-1, out=scores).to(q.dtype)
        ctx.save_for_backward(q, k, v, probs)
        return probs @ v

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        grad_scores = torch._softmax_backward_data(grad_y @ v.transpose(-2, -1), probs, -1, probs.dtype)
        return ((grad_scores @ k) * scale, (grad_scores.transpose(-2, -1) @ q) * scale,
                probs.transpose(-2, -1) @ grad_y, None)


def causal_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) as batched matmuls. Queries go in
    blocks of `block` rows, each against the keys up to its last query only: at T=256 that skips a
    quarter of the score matrix, all of it masked (~10% faster than one block)."""
    T, S = q.shape[2], k.shape[2]
    if T > block:  # query rows [s, e) sit at positions S - T + s .. S - T + e - 1
        return torch.cat([causal_matmul_attention(q[:, :, s:s + block], k[:, :, :S - T + min(s + block, T)],
                                                  v[:, :, :S - T + min(s + block, T)], block)
                          for s in range(0, T, block)], dim=2)
    bias = torch.full((T, S), float("-inf"), device=q.device).triu_(S - T + 1)
    with torch.autocast(q.device.type, enabled=False):  # the dtypes are chosen inside
        return _MatmulAttention.apply(q, k, v, bias)


def padding_mask(key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """The `attn_mask` for the last `n_query` of the positions in `key_mask` ([B, S] bool, True = real
    token): [B, 1, n_query, S], True where a query may attend (`Attention` adds causality).

    Every query also sees its own key, so that a pad query (whose output nobody uses) attends to one
    key instead of none: an all-masked row gives NaN, which would reach real tokens in the next layer
    through the pad's value vector (a zero attention weight times NaN is NaN)."""
    S = key_mask.shape[1]
    keys = torch.arange(S, device=key_mask.device)
    own = keys[None, :] == keys[S - n_query:, None]  # [T, S]
    return key_mask[:, None, None, :] | own
