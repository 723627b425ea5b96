"""Attention backends: the kernels the one `Attention` module (lmlab/nn/attention.py) can run, by name.

Every backend computes softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1) for q
[B, H, T, d] and k, v [B, H_kv, S, d]; they differ in what they materialise:

- `eager`: the reference math, the whole [T, S] score matrix in float32; what the others are tested
  against.
- `sdpa`: PyTorch's `scaled_dot_product_attention` (a fused kernel where one exists; on CPU in bf16
  training, lmlab's blocked matmul path, see attention.py).
- `sliding_window`: causal local attention with global tokens (Longformer, Beltagy et al. 2020): query
  i sees keys i - w < j <= i (its window of w) and every earlier global key: the first `n_global`
  positions and, with `global_stride` = s, every s-th one (positions s - 1, 2s - 1, ...: memory
  tokens that summarise their window for every later query, so information crosses any distance in two
  layers). Computed in chunks of queries against the band of keys they can see, so memory is
  O(T (w + G)) for G global keys, never a [T, T] score matrix or mask. `global_qk` scores the global
  keys with other queries and keys than the band's (the model passes them without RoPE, so the global
  path is position-free and reads at any distance as it did in training).

FlexAttention (`torch.nn.attention.flex_attention` with a `mask_mod`) expresses the same mask; it is
not used here because on CPU it needs `torch.compile` (eager FlexAttention materialises the full score
matrix) and compiling per shape cost more than the banded kernel saves at the lengths we train.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each key/value head serves H / H_kv query heads."""
    if k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    return k, v


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False, dropout_p: float = 0.0, **_: object) -> torch.Tensor:
    """The reference: float32 scores and soft-max, causal over the last T of S positions."""
    k, v = _expand_kv(q, k, v)
    T, S = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if is_causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    p = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0, **_: object) -> torch.Tensor:
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          dropout_p=dropout_p, **gqa)


def is_global(pos: torch.Tensor, n_global: int, stride: int = 0) -> torch.Tensor:
    """Whether positions `pos` hold global tokens: the first `n_global`, and every `stride`-th."""
    glob = pos < n_global
    return glob | (pos % stride == stride - 1) if stride > 0 else glob


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, n_global: int,
                stride: int = 0) -> torch.Tensor:
    """[len(q_pos), len(k_pos)] bool: causal, within `window` positions, or a global key."""
    d = q_pos[:, None] - k_pos[None, :]
    return (d >= 0) & ((d < window) | is_global(k_pos, n_global, stride)[None, :])


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             n_global: int = 0, global_stride: int = 0, key_mask: torch.Tensor | None = None,
                             global_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
                             dropout_p: float = 0.0, chunk: int = 0, **_: object) -> torch.Tensor:
    """Causal sliding-window + global attention of T queries over the same T positions, banded.

    Queries go in chunks of c (default: the window); chunk n's queries [nc, nc + c) see the keys
    [nc - w + 1, nc + c) (a strided view of the padded keys, c + w - 1 wide) and the g global keys
    (those of them not already in the band). `key_mask` ([B, T] bool, True = real token) masks padding,
    and global positions then count real tokens only; distances are counted in slots, so
    padding must sit at either end of a row (as the engine's left padding does). Every query keeps its
    own key, so a pad row never soft-maxes over nothing."""
    B, H, T, d = q.shape
    k, v = _expand_kv(q, k, v)
    w = window
    c = chunk or min(w, T)
    n = -(-T // c)  # chunks
    pad_end = n * c - T
    scale = d ** -0.5
    qc = F.pad(q, (0, 0, 0, pad_end)).view(B, H, n, c, d)
    # keys/values padded with w - 1 in front: chunk n's band starts at padded index n * c
    kp = F.pad(k, (0, 0, w - 1, pad_end))
    vp = F.pad(v, (0, 0, w - 1, pad_end))
    span = c + w - 1
    kb = kp.unfold(2, span, c).transpose(-1, -2)  # [B, H, n, span, d], a view
    vb = vp.unfold(2, span, c).transpose(-1, -2)
    scores = torch.einsum("bhncd,bhnsd->bhncs", qc.float(), kb.float()) * scale
    # band mask, the same for every chunk: query a of a chunk, key b of its band sit w - 1 + a - b apart
    a = torch.arange(c, device=q.device)[:, None]
    b = torch.arange(span, device=q.device)[None, :]
    band = (b >= a) & (b <= a + w - 1)
    k_abs = torch.arange(n, device=q.device)[:, None] * c - (w - 1) + torch.arange(span, device=q.device)
    valid = band[None] & (k_abs >= 0)[:, None, :]  # [n, c, span]: no front padding
    if key_mask is not None:
        km = F.pad(key_mask, (w - 1, pad_end)).unfold(1, span, c)  # [B, n, span]
        q_abs = torch.arange(n * c, device=q.device).view(n, c)
        own = (k_abs[:, None, :] == q_abs[:, :, None])  # [n, c, span]
        valid = valid[None] & (km[:, :, None, :] | own[None])  # [B, n, c, span]
        valid = valid[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    parts = [scores]
    # the global keys of each row, by position (real tokens only), as slot indices gidx [B, G]
    pos = torch.arange(T, device=q.device).expand(B, T) if key_mask is None else key_mask.long().cumsum(1) - 1
    glob_slot = is_global(pos, n_global, global_stride)
    if key_mask is not None:
        glob_slot = glob_slot & key_mask
    g = int(glob_slot.sum(1).max())
    if g > 0:
        gidx = torch.argsort((~glob_slot).to(torch.int8), dim=1, stable=True)[:, :g]
        gvalid = glob_slot.gather(1, gidx)
        gq, gk = qc.float(), k
        if global_qk is not None:  # the global path's own queries and keys
            gq = F.pad(global_qk[0], (0, 0, 0, pad_end)).view(B, H, n, c, d).float()
            gk = _expand_kv(q, global_qk[1], global_qk[1])[0]
        kg = gk.gather(2, gidx[:, None, :, None].expand(B, H, g, d))
        vg = v.gather(2, gidx[:, None, :, None].expand(B, H, g, d))
        q_abs = torch.arange(n * c, device=q.device).view(n, c)
        # only those the band does not already hold: slot j <= i - w
        glob = (gidx[:, None, None, :] <= q_abs[None, :, :, None] - w) & gvalid[:, None, None, :]  # [B, n, c, g]
        gs = torch.einsum("bhncd,bhgd->bhncg", gq, kg.float()) * scale
        parts.append(gs.masked_fill(~glob[:, None], float("-inf")))
    p = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    y = torch.einsum("bhncs,bhnsd->bhncd", p[..., :span], vb.float())
    if g > 0:
        y = y + torch.einsum("bhncg,bhgd->bhncd", p[..., span:], vg.float())
    return y.reshape(B, H, n * c, d)[:, :, :T].to(q.dtype)


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "sliding_window": sliding_window_attention,
}
