"""One attention module: multi-head or grouped-query, causal or bidirectional, with a KV cache.

The projection of queries, keys and values is a single fused matmul (n_head + 2 * n_kv_head heads),
and the attention itself is `scaled_dot_product_attention`, which picks a fused kernel where one
exists, except when training in bf16 on CPU, where plain batched matmuls are faster
(`causal_matmul_attention`). Position information other than additive embeddings (e.g. RoPE)
enters through `rotary`. `backend` picks another kernel from lmlab/nn/attention_backends.py:
`eager` (the reference math) or `sliding_window` (local window + global tokens, banded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.attention_backends import ATTENTION_BACKENDS, sliding_window_attention, window_mask
from lmlab.nn.device_paths import cpu_kernels
from lmlab.nn.kv_cache import KVCache
from lmlab.nn.position import alibi_slopes

# SDPA shares each key/value head among n_head / n_kv_head query heads itself since PyTorch 2.5,
# without the copies repeat_interleave makes (half the time of a decode step's attention on CPU)
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    # the self-attention kernel; inference conversions may swap in another per module (lmlab/nn/quant.py)
    sdpa = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, *, bias: bool = True,
                 dropout: float = 0.0, causal: bool = True, backend: str = "sdpa", window: int = 0,
                 n_global: int = 0, global_stride: int = 0, global_rope: bool = True, alibi: bool = False,
                 qkv_bias: bool | None = None):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend '{backend}' (known: {', '.join(ATTENTION_BACKENDS)})")
        if backend == "sliding_window" and (window < 1 or not causal):
            raise ValueError("sliding_window attention needs window >= 1 and causal attention")
        self.backend, self.window, self.n_global = backend, window, n_global
        # strided global tokens, and whether the global path rotates its queries/keys (RoPE) or not
        self.global_stride, self.global_rope = global_stride, global_rope
        if alibi and (backend == "sliding_window" or not causal):
            raise ValueError("ALiBi is supported on causal attention with the eager or sdpa backend")
        self.alibi_slopes = alibi_slopes(n_head) if alibi else None  # a constant, not a parameter
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        if n_embd % n_head or n_head % self.n_kv_head:
            raise ValueError(f"n_embd={n_embd}, n_head={n_head}, n_kv_head={self.n_kv_head} do not divide")
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.dropout = dropout
        # qkv_bias: biases on the query/key/value projections alone (Qwen2), None: as `bias`
        self.qkv = nn.Linear(n_embd, (n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=bias if qkv_bias is None else qkv_bias)
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
                attn_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention over `x`, or with `cross_kv` (from `cross_kv(memory)`) cross-attention:
        queries from `x`, keys/values fixed (no cache, no causality, no rotary). `key_mask` ([B, T], True
        = real token) is the padding `attn_mask` was built from, for backends that never build a [T, S]
        mask."""
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
        # all heads at once, [B, T, n_head + 2 n_kv_head, hd], split (not sliced: the backward pass of a
        # split is one concatenation, of slices a zero-filled buffer each); queries and keys rotate in one call
        heads = self.qkv(x).view(B, T, nh + 2 * nkv, hd)
        global_qk = None
        if rotary is None:
            q, k, v = (t.transpose(1, 2) for t in heads.split([nh, nkv, nkv], dim=2))
        else:
            qk, v = (t.transpose(1, 2) for t in heads.split([nh + nkv, nkv], dim=2))
            q, k = rotary(qk).split([nh, nkv], dim=1)
            if not self.global_rope:
                global_qk = tuple(qk.split([nh, nkv], dim=1))
        past, mask, complete = 0, attn_mask, False
        dropout_p = self.dropout if self.training else 0.0
        if self.backend == "sliding_window":
            return self.proj(self._windowed(q, k, v, kv_cache, layer_idx, key_mask, dropout_p, global_qk)
                             .transpose(1, 2).reshape(B, T, nh * hd))
        if kv_cache is not None:
            k, v = kv_cache.append(layer_idx, k, v)
            step = kv_cache.step
            if step.attn_mask is not None:  # rows of different lengths, or pads: the cache's mask is
                # complete (each row's own causality, length and pads)
                mask = step.attn_mask if mask is None else (mask & step.attn_mask)
                complete = True
            else:
                past = step.start
        if self.alibi_slopes is not None:
            mask, complete = self._alibi_mask(q, k.shape[2], kv_cache, mask), True
        gqa = nkv != nh
        if gqa and not _SDPA_GQA:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            gqa = False
        is_causal = False
        if self.causal and T > 1 and not complete:
            if past == 0 and mask is None:
                is_causal = True
            else:  # query i (absolute position past + i) sees keys 0 .. past + i
                S = k.shape[2]
                causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                mask = causal if mask is None else (mask & causal)
        if self.backend == "eager":
            y = ATTENTION_BACKENDS["eager"](q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        elif is_causal and not gqa and dropout_p == 0.0 and _matmul_attention_wins(q, k):
            y = causal_matmul_attention(q, k, v)
        else:
            y = self.sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                          **({"enable_gqa": True} if gqa else {}))
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.proj(y)

    def _alibi_mask(self, q: torch.Tensor, S: int, kv_cache: KVCache | None,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """ALiBi (Press et al. 2022): head h adds -m_h (i - j) to the score of query i and key j, with
        causality and `mask` folded in, as one float mask [B or 1, H, T, S]. Distances are counted in
        cache slots, which equal positions because each row's tokens sit in consecutive slots."""
        T, dev = q.shape[2], q.device
        if kv_cache is None:
            q_slot = torch.arange(S - T, S, device=dev)
        elif kv_cache.step.slots is not None:  # rows at different lengths
            q_slot = kv_cache.step.slots
        else:
            q_slot = kv_cache.step.start + torch.arange(T, device=dev)
        dist = q_slot[..., :, None] - torch.arange(S, device=dev)  # [(B,) T, S]
        allowed = dist >= 0
        if mask is not None:
            allowed = allowed & mask
        if allowed.dim() == 2:
            allowed = allowed[None, None]
        elif allowed.dim() == 3:
            allowed = allowed[:, None]
        slopes = self.alibi_slopes.to(dev)[:, None, None]
        bias = -slopes * dist.clamp(min=0).float().unsqueeze(-3)  # [(B,) H, T, S]
        return bias.masked_fill(~allowed, float("-inf")).to(q.dtype)

    def _windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                  layer_idx: int, key_mask: torch.Tensor | None, dropout_p: float,
                  global_qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Sliding-window + global attention: banded over a whole sequence; with a KV cache, a decode
        step attends through the window mask of its own positions: over the g + w keys of a rolling
        cache (lmlab/nn/kv_cache.py), or O(S) keys of a full one."""
        opts = {"window": self.window, "n_global": self.n_global, "global_stride": self.global_stride,
                "dropout_p": dropout_p}
        if kv_cache is None:
            return sliding_window_attention(q, k, v, key_mask=key_mask, global_qk=global_qk, **opts)
        if global_qk is not None:
            raise ValueError("a KV cache keeps keys after RoPE, and this model's global path reads them "
                             "without it: decode it without a cache (recomputing the sequence)")
        if kv_cache.rolling(layer_idx):
            if kv_cache.window != (self.window, self.n_global):
                raise ValueError(f"KV cache window {kv_cache.window} != layer {layer_idx}'s "
                                 f"{(self.window, self.n_global)}")
            k, v, k_pos = kv_cache.append_window(layer_idx, k, v)
            q_pos = kv_cache.step.new_pos
            if k.shape[2] == q.shape[2] and int(q_pos[0]) == 0:  # a prefill into an empty ring: banded
                return sliding_window_attention(q, k, v, **opts)
            mask = window_mask(q_pos, k_pos, self.window, self.n_global)
            return ATTENTION_BACKENDS["sdpa"](q, k, v, attn_mask=mask, dropout_p=dropout_p)
        k, v = kv_cache.append(layer_idx, k, v)
        step = kv_cache.step
        if step.attn_mask is not None:
            raise ValueError("sliding-window attention with a KV cache needs rows of equal length without "
                             "padding (decode such prompts one at a time)")
        past, T, S = step.start, q.shape[2], k.shape[2]
        if past == 0 and T == S:  # a prefill: banded
            return sliding_window_attention(q, k, v, **opts)
        mask = window_mask(torch.arange(past, past + T, device=q.device), torch.arange(S, device=q.device),
                           self.window, self.n_global, self.global_stride)
        return ATTENTION_BACKENDS["sdpa"](q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _matmul_attention_wins(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `causal_matmul_attention` beats SDPA here: when training in bf16 on CPU. There the
    fused kernel's backward pass is slow (2x slower at T=256, 1.2x at T=1024 on AVX-512-bf16; in
    float32 SDPA is the faster one), while batched bf16 matmuls run near the matmul peak. The full
    score matrix is kept for the backward pass, so only while that is small."""
    B, H, T, _ = q.shape
    return (cpu_kernels(q) and q.dtype == torch.bfloat16 and q.requires_grad
            and B * H * T * k.shape[2] <= _MATMUL_ATTENTION_MAX_SCORES)


_MATMUL_ATTENTION_MAX_SCORES = 2**25  # 64 MiB of bf16 scores per layer


class _CausalMatmulAttention(torch.autograd.Function):
    """Causal softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) as batched matmuls, queries in
    blocks of `block` rows, each against the keys up to its last query only: in blocks of 64 at T=256
    that skips 3/8 of the score matrix, all of it masked (forward and backward ~10% faster than in
    blocks of 128, which skip 1/4).

    Scores and soft-max are float32, the other products (and the whole backward pass) in the dtype of
    q. With scores rounded to bf16 (off by up to 2^-9 of their size before the exponential) a 300-step
    bf16 run ended 1.2% above its fp32 twin in val loss; with float32 scores 0.5% (SDPA, float32 inside
    throughout: 0.2%).

    q, k and v are copied once into [B * H, T, head_dim] and every block reads and writes slices of
    those (matmuls take the strided slices and transposes as they are), so the only copies are one per
    operand and gradient; slicing [B, H, T, head_dim] views per block instead copied every operand of
    every matmul and left autograd to zero-fill and sum the sliced gradients (in a profile of the bf16
    GPT step, a fifth of the time spent outside the matmuls)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
        B, H, T, hd = q.shape
        S = k.shape[2]
        q, k, v = (t.reshape(B * H, t.shape[2], hd) for t in (q, k, v))
        qf, kf = q.to(torch.float32, copy=True).mul_(hd ** -0.5), k.float()
        y = torch.empty_like(q)
        probs = []
        for s in range(0, T, block):  # query rows [s, e) sit at positions S - T + s .. S - T + e - 1
            e = min(s + block, T)
            n_keys = S - T + e
            scores = torch.bmm(qf[:, s:e], kf[:, :n_keys].transpose(1, 2))
            # only the last e - s keys are the future of some query in the block
            mask = torch.full((e - s, e - s), float("-inf"), device=q.device).triu_(1)
            scores[:, :, n_keys - (e - s):].add_(mask)
            p = torch.softmax(scores, dim=-1, out=scores).to(q.dtype)
            torch.bmm(p, v[:, :n_keys], out=y[:, s:e])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.block, ctx.shape = block, (B, H, T, S, hd)
        return y.view(B, H, T, hd)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors
        B, H, T, S, hd = ctx.shape
        scale = hd ** -0.5
        dy = grad_y.to(q.dtype).reshape(B * H, T, hd)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # the last block sees every key, so it writes all of dk and dv; the others add to a prefix
        starts = list(range(0, T, ctx.block))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + ctx.block, T)
            n_keys, p, beta = S - T + e, probs[i], 0 if i == len(starts) - 1 else 1
            grad_scores = torch._softmax_backward_data(torch.bmm(dy[:, s:e], v[:, :n_keys].transpose(1, 2)),
                                                       p, -1, p.dtype)
            dq[:, s:e].baddbmm_(grad_scores, k[:, :n_keys], beta=0, alpha=scale)
            dk[:, :n_keys].baddbmm_(grad_scores.transpose(1, 2), q[:, s:e], beta=beta, alpha=scale)
            dv[:, :n_keys].baddbmm_(p.transpose(1, 2), dy[:, s:e], beta=beta)
        return dq.view(B, H, T, hd), dk.view(B, H, S, hd), dv.view(B, H, S, hd), None


def causal_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Causal attention of q ([B, H, T, head_dim]) over k, v ([B, H, S, head_dim], S >= T: the queries
    are the last T positions) without SDPA; see `_CausalMatmulAttention`."""
    with torch.autocast(q.device.type, enabled=False):  # the dtypes are chosen inside
        return _CausalMatmulAttention.apply(q, k, v, block)


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


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The `attn_mask` of rows that pack several documents ([B, T] ids; a document is a run of equal
    ids): [B, 1, T, T], True where query and key belong to the same document, so no token attends
    across documents (`Attention` adds causality: together a block-diagonal causal mask). Every
    query sees its own key, so no row of the soft-max is empty."""
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
