"""Images as tokens (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): non-overlapping p x p
patches, each flattened and projected to n_embd (one strided convolution does both), plus learned
position embeddings that can be interpolated to another grid for another image size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H / p) (W / p), n_embd], patches in row-major order (as ViT and HF)."""

    def __init__(self, n_channels: int, patch_size: int, n_embd: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(n_channels, n_embd, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected images [B, {self.proj.in_channels}, H, W], got {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image of {H}x{W} pixels is not a whole number of {self.patch_size}-pixel patches")
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
    """Position embeddings [1, n_prefix + g * g, D] learned on a square g x g grid, resized to `grid`
    (rows, columns) by bicubic interpolation, the prefix (class token) rows kept as they are. ViT sec.
    3.2 fine-tunes at a higher resolution this way; the arithmetic is transformers' ViT
    `interpolate_pos_encoding` (bicubic, align_corners=False), so logits agree with it."""
    prefix, patches = pos[:, :n_prefix], pos[:, n_prefix:]
    n, dim = patches.shape[1], patches.shape[2]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{n} position embeddings do not form a square grid")
    if (side, side) == tuple(grid):
        return pos
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([prefix, resized.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
