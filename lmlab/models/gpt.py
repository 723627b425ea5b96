"""GPT (Radford et al. 2018, 2019): a decoder-only Transformer with learned positions.

Pre-LayerNorm blocks, GELU MLP, tied input/output embeddings, causal SDPA attention. Weights start
at N(0, 0.02) with the residual projections scaled by 1/sqrt(2 * n_layer), as in GPT-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig
from lmlab.nn.block import Block
from lmlab.nn.kv_cache import KVCache
from lmlab.nn.loss import linear_cross_entropy
from lmlab.nn.norm import make_norm


@dataclass(kw_only=True)
class GPTConfig(ModelConfig):
    family: str = "gpt"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    loss_chunk_size: int = 512  # positions per chunk of the fused output-layer loss (0: plain logits)


class GPT(nn.Module):
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("GPTConfig.vocab_size must be set (it comes from the tokenizer)")
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, activation=c.activation, norm="layernorm", norm_eps=c.norm_eps,
                  bias=c.bias, dropout=c.dropout, causal=True)
            for _ in range(c.n_layer))
        self.norm_f = make_norm("layernorm", c.n_embd, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=c.init_std / math.sqrt(2 * c.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting tied weights once; `non_embedding` leaves out token and position tables
        (Kaplan et al. 2020's N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        p = self.wte.weight
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.n_embd // c.n_head,
                       dtype=dtype or p.dtype, device=p.device)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> LMOutput:
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_cache, layer_idx=i)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm_f(x)
        if targets is not None and self.config.loss_chunk_size > 0:
            # training: the loss without materialising the logits (see lmlab/nn/loss.py)
            loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                        chunk_size=self.config.loss_chunk_size)
            return LMOutput(logits=None, loss=loss)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss)
