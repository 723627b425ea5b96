"""ViT (Dosovitskiy et al. 2021): an image cut into patches read as a sequence of tokens by the same
bidirectional Transformer blocks as BERT's, here pre-norm as in the paper (eq. 2-3) and transformers'
ViTModel: x + attn(norm(x)), x + mlp(norm(x)), erf-GELU MLP, then a final LayerNorm.

The image is summarised by a learned class token prepended to the patches (the paper's default, and
what `ViTForImageClassification` reads) or by the mean of the patch tokens (`pool="mean"`, sec.
D.3 of the paper finds both work). A linear head maps it to class logits. Images of another size
than `image_size` take bicubically interpolated position embeddings (lmlab/nn/patch.py). With
`n_classes=0` there is no head: the model is an image encoder (the captioner's, captioner.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig, count_params, init_normal
from lmlab.nn.block import Block
from lmlab.nn.patch import PatchEmbed, interpolate_pos_embed

POOLS = ("cls", "mean")


@dataclass(kw_only=True)
class ViTConfig(ModelConfig):
    family: str = "vit"
    image_size: int = 224          # side of the square images the position embeddings are learned for
    patch_size: int = 16
    n_channels: int = 3
    n_classes: int = 0             # 0: no head (an encoder); set from the prepared data at train time
    labels: list[str] = field(default_factory=list)  # class names, index = label id (from the data)
    pool: str = "cls"              # cls: the class token | mean: mean of the patch tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int = 3072
    activation: str = "gelu"       # exact (erf) GELU, as ViT and transformers' default "gelu"
    norm_eps: float = 1e-12        # transformers' ViTConfig.layer_norm_eps
    dropout: float = 0.0
    init_std: float = 0.02
    label_smoothing: float = 0.0   # training loss only (Szegedy et al. 2016)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    config_class = ViTConfig
    objective = "classify"  # picks the training-batch sampler (lmlab/data/objectives.py)

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        if c.pool not in POOLS:
            raise ValueError(f"ViT pool must be one of {POOLS}, not '{c.pool}'")
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        self.n_prefix = 1 if c.pool == "cls" else 0
        self.patch = PatchEmbed(c.n_channels, c.patch_size, c.n_embd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd)) if self.n_prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_prefix + c.n_patches, c.n_embd))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, mlp_hidden=c.mlp_hidden, activation=c.activation, norm_eps=c.norm_eps,
                  dropout=c.dropout, causal=False) for _ in range(c.n_layer))
        self.norm_f = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.head = nn.Linear(c.n_embd, c.n_classes) if c.n_classes > 0 else None
        init_normal(self, c.init_std)
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=c.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = count_params(self, False, ())
        return n - self.pos_embed.numel() if non_embedding else n

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, n_prefix + patches, n_embd] (class token first, if any)."""
        x = self.patch(pixel_values.to(self.pos_embed.dtype))
        H, W = pixel_values.shape[-2:]
        grid = (H // self.config.patch_size, W // self.config.patch_size)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + interpolate_pos_embed(self.pos_embed, grid, self.n_prefix))
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0] if self.n_prefix else h.mean(dim=1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> LMOutput:
        if self.head is None:
            raise ValueError("this ViT has no classifier head (n_classes=0): use encode()")
        logits = self.head(self.pool(self.encode(pixel_values)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        return LMOutput(logits=logits, loss=loss)
