"""Image-to-text: a ViT's patch tokens as a prefix for a small causal text decoder.

The image goes through a ViT encoder (vit.py, mean-pool variant: no class token, so every token is a
patch), a linear projection maps its tokens to the decoder's width, and they sit before the caption
in one causal sequence: [patch_1 .. patch_P, </s>, w_1 .. w_n] predicts [w_1 .. w_n, </s>]. This is the
prefix design of GIT (Wang et al. 2022), LLaVA (Liu et al. 2023) and PaLI rather than the
cross-attention of Flamingo or an encoder-decoder: the decoder keeps the plain decoder-only blocks,
and at generation the image enters the KV cache once, in the prefill, after which the one decode loop
(lmlab/generate/engine.py) runs unchanged. docs/vision/README.md says what this costs.

`config.block_size` counts caption tokens only; the position table covers the P image tokens too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig, count_params, init_normal
from lmlab.models.transformer.vit import ViT, ViTConfig
from lmlab.nn.attention import padding_mask
from lmlab.nn.block import Block
from lmlab.nn.kv_cache import KVCache
from lmlab.nn.position import position_ids_from_mask


@dataclass(kw_only=True)
class CaptionerConfig(ModelConfig):
    family: str = "captioner"
    block_size: int = 32           # caption tokens (the image's tokens come on top)
    image_size: int = 32
    patch_size: int = 4
    n_channels: int = 3
    n_enc_layer: int = 2           # ViT encoder layers
    n_layer: int = 2               # text decoder layers
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 512
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # token ids the decoder reads as `blind_to` (e.g. the colour words as <mask>): the next word, the
    # shape, then has to come from the picture, not from which shapes went with that colour in training
    # (a language prior that fails on unseen colour-shape pairs; docs/vision/README.md measures it)
    blind_ids: tuple[int, ...] = ()
    blind_to: int = 0

    def vision(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, n_channels=self.n_channels,
                         n_classes=0, pool="mean", n_layer=self.n_enc_layer, n_head=self.n_head,
                         n_embd=self.n_embd, mlp_hidden=self.mlp_hidden, norm_eps=self.norm_eps,
                         dropout=self.dropout, init_std=self.init_std)


class Captioner(nn.Module):
    config_class = CaptionerConfig
    objective = "caption"  # picks the training-batch sampler (lmlab/data/objectives.py)

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        c = self.config = config
        if c.vocab_size <= 0:
            raise ValueError("CaptionerConfig.vocab_size must be set (it comes from the tokenizer)")
        self.vision = ViT(c.vision())
        self.n_prefix_tokens = c.vision().n_patches  # cache positions the image takes before the text
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(self.n_prefix_tokens + c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, mlp_hidden=c.mlp_hidden, norm_eps=c.norm_eps, dropout=c.dropout, causal=True)
            for _ in range(c.n_layer))
        self.norm_f = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        init_normal(self, c.init_std)  # the ViT's position embeddings keep their own (truncated normal)
        self.lm_head.weight = self.wte.weight
        if not all(0 <= i < c.vocab_size for i in (*c.blind_ids, c.blind_to)):
            raise ValueError(f"blind_ids/blind_to must be token ids below vocab_size {c.vocab_size}")
        self.register_buffer("blind_ids", torch.tensor(c.blind_ids, dtype=torch.long), persistent=False)

    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding, (self.wte, self.wpe))

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A cache for `max_len` text tokens (default block_size) after the image's tokens."""
        attn = self.blocks[0].attn
        return KVCache(len(self.blocks), batch_size, attn.n_kv_head,
                       self.n_prefix_tokens + (max_len or self.config.block_size), attn.head_dim,
                       dtype=dtype or self.wte.weight.dtype, device=self.wte.weight.device)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, pixel_values: torch.Tensor | None = None) -> LMOutput:
        """Logits of the text positions. `pixel_values` [B, C, H, W] are needed unless the image is
        already in `kv_cache` (a decoding step after the prefill)."""
        B, T = input_ids.shape
        if len(self.blind_ids):
            input_ids = input_ids.masked_fill(torch.isin(input_ids, self.blind_ids), self.config.blind_to)
        x = self.wte(input_ids)
        P = 0
        if pixel_values is not None:
            if pixel_values.shape[0] != B:
                raise ValueError(f"{pixel_values.shape[0]} images for {B} captions")
            prefix = self.proj(self.vision.encode(pixel_values))
            P = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        elif kv_cache is None or kv_cache.pos == 0:
            raise ValueError("a captioner reads an image first: pass pixel_values")
        S = x.shape[1]
        if S > self.wpe.num_embeddings:
            raise ValueError(f"{S - P} caption tokens exceed block_size {self.config.block_size}")
        attn_mask = None
        if kv_cache is not None:
            step = kv_cache.begin(S, attention_mask)
            position_ids = step.position_ids
            if int(position_ids.max()) >= self.wpe.num_embeddings:
                kv_cache.step = None
                raise ValueError(f"the caption exceeds block_size {self.config.block_size}")
        else:
            key_mask = attention_mask.to(torch.bool) if attention_mask is not None else None
            if key_mask is not None and bool(key_mask.all()):
                key_mask = None
            position_ids = (torch.arange(S, device=x.device)[None] if key_mask is None
                            else position_ids_from_mask(key_mask))
            attn_mask = padding_mask(key_mask, S) if key_mask is not None else None
        x = self.drop(x + self.wpe(position_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, layer_idx=i, kv_cache=kv_cache, attn_mask=attn_mask)
        if kv_cache is not None:
            kv_cache.commit()
        x = self.norm_f(x[:, P:])
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep > 0 else x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss)
