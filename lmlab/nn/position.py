"""Position information: position ids from a padding mask, and rotary embeddings (RoPE).

RoPE (Su et al. 2021, "RoFormer") rotates each query/key feature pair by an angle proportional to the
token's position, so attention scores depend on relative positions only. Pairs follow the
*half-split* layout of Hugging Face Llama (feature i pairs with i + head_dim/2, `rotate_half`), not
the interleaved (2i, 2i+1) layout of Meta's original code; HF checkpoints store q/k weights permuted
for this layout, so no permutation is needed when loading them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def position_ids_from_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only ([B, S] bool -> [B, S] long): the first real token of
    every row is at 0, so a left-padded row sees the same positions as the unpadded sequence.
    Pads get 0, as `transformers` computes them in `generate`."""
    pos = key_mask.long().cumsum(-1) - 1
    return pos.masked_fill(~key_mask, 0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding:
    """cos/sin tables for given position ids; holds no parameters (nothing to save or load).

    The inverse frequencies theta^(-2i/d) are recomputed per call in float32 (d/2 numbers), so a model
    built on the meta device or moved between devices needs no buffer bookkeeping.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] positions -> float32 cos, sin of shape [B, 1, T, head_dim] (broadcast over heads)."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float, device=position_ids.device) / d))
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def rotary(self, position_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The `rotary` hook for `Attention`: rotates a [B, H, T, head_dim] query or key tensor (in its
        own dtype, so under autocast q and k stay in the low-precision dtype).

        Called once per layer, so it is kept to three kernels: since both halves of `sin` are equal,
        rotate_half(x) * sin == roll(x, d/2) * [-sin | sin], and the tables are converted to x's dtype
        once per forward, not once per layer."""
        cos, sin = self.cos_sin(position_ids)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

        def apply(x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in tables:
                tables[x.dtype] = (cos.to(x.dtype), sin.to(x.dtype))
            c, s = tables[x.dtype]
            return torch.addcmul(x * c, x.roll(half, dims=-1), s)

        return apply
