"""What every decoder-only family shares: token embedding -> blocks -> final norm -> output layer -> loss.

A family (GPT, Llama) chooses its blocks (norm, activation, biases, GQA) and how positions enter:
`embed` adds learned position embeddings (GPT), `rotary` rotates queries and keys (Llama).
Padding, position ids, the KV cache and the loss are handled here once.

Padding: `attention_mask` ([B, T], 1 = token, 0 = pad) works for right padding (scoring) and left
padding (batched generation). Position ids then count real tokens only, so a left-padded row sees
the positions of its unpadded self, as `transformers.generate` computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig, count_params, init_normal
from lmlab.nn.attention import document_mask, padding_mask
from lmlab.nn.block import Block
from lmlab.nn.kv_cache import KVCache
from lmlab.nn.loss import linear_cross_entropy
from lmlab.nn.moe import MoE, MoEConfig, load_balancing_loss, router_z_loss
from lmlab.nn.norm import make_norm
from lmlab.nn.position import position_ids_from_documents, position_ids_from_mask


@dataclass(kw_only=True)
class AttentionConfig:
    """Which attention the decoder families run (lmlab/nn/attention_backends.py), mixed into their configs.

    `sliding_window` > 0 gives the layers a local window of that many positions plus `global_tokens`
    global ones (Longformer); with `global_every` = m, every m-th layer attends fully instead (the
    local/global alternation of Gemma 2 is m = 2)."""

    attention: str = "sdpa"       # eager | sdpa | sliding_window (set by sliding_window > 0)
    sliding_window: int = 0       # w: keys i - w < j <= i (0: full causal attention)
    global_tokens: int = 0        # the first g positions attend and are attended everywhere (causally)
    global_every: int = 0         # every m-th layer full attention (0: every layer windowed)
    global_stride: int = 0        # s > 0: every s-th position is global too (a memory token for later queries)
    global_rope: bool = True      # False: the global path scores queries and keys without RoPE


def layer_attention(c: ModelConfig, i: int) -> dict:
    """The `Attention` options of layer i under `c` (an `AttentionConfig`)."""
    backend = getattr(c, "attention", "sdpa")
    window = getattr(c, "sliding_window", 0)
    if backend == "sliding_window" and window <= 0:
        raise ValueError("attention='sliding_window' needs sliding_window > 0 (the window length)")
    if (c.global_stride or not c.global_rope) and window <= 0:
        raise ValueError("global_stride and global_rope=False shape sliding-window attention: set sliding_window")
    if not c.global_rope and not hasattr(c, "rope_theta"):
        raise ValueError("global_rope=False needs a RoPE model (its positions enter through the embeddings)")
    extra = {"alibi": True} if getattr(c, "position", "") == "alibi" else {}
    if getattr(c, "qkv_bias", False):  # Qwen2: biases on q/k/v only
        extra["qkv_bias"] = True
    if window <= 0 or (c.global_every and (i + 1) % c.global_every == 0):
        return {"backend": "sdpa" if backend == "sliding_window" else backend, **extra}
    return {"backend": "sliding_window", "window": window, "n_global": c.global_tokens,
            "global_stride": c.global_stride, "global_rope": c.global_rope, **extra}


class DecoderLM(nn.Module):
    """Base of the decoder families. `config` needs n_layer, n_head, n_embd, vocab_size, block_size,
    dropout, norm_eps, tie_embeddings, init_std and loss_chunk_size; `block` holds the per-family
    `Block` options; `wpe` is a learned position table, for families that have one."""

    def __init__(self, config: ModelConfig, *, norm: str, block: dict, wpe: nn.Module | None = None):
        super().__init__()
        c = config
        if c.vocab_size <= 0:
            raise ValueError(f"{type(c).__name__}.vocab_size must be set (it comes from the tokenizer)")
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = wpe
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, norm=norm, norm_eps=c.norm_eps, dropout=c.dropout, causal=True,
                  attention=layer_attention(c, i),
                  moe=c if isinstance(c, MoEConfig) and c.is_moe_layer(i) else None, **block)
            for i in range(c.n_layer))
        self.norm_f = make_norm(norm, c.n_embd, c.norm_eps, block.get("bias", True))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # GPT-2's init: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layer)
        init_normal(self, c.init_std)
        for name, p in self.named_parameters():
            if name.endswith("mlp.experts_up"):
                nn.init.normal_(p, mean=0.0, std=c.init_std)
            if name.endswith(("attn.proj.weight", "mlp.down.weight", "mlp.experts_down", "mlp.shared.down.weight")):
                nn.init.normal_(p, mean=0.0, std=c.init_std / math.sqrt(2 * c.n_layer))

    # -- family hooks ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)
        return x + self.wpe(position_ids) if self.wpe is not None else x

    def rotary(self, position_ids: torch.Tensor):
        """The `Attention.rotary` hook for these positions, or None (positions enter in `embed`)."""
        return None

    # -- shared -------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding, (self.wte, self.wpe))

    # the KV cache's element type when make_kv_cache is not given one (None: the residual stream's).
    # torch.float16 is llama.cpp's default cache type: half the memory, K/V rounded (see lmlab/nn/quant.py)
    kv_cache_dtype: torch.dtype | None = None

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        # the final norm's dtype is the residual stream's (lmlab/nn/quant.py may have swapped wte out)
        attn, p = self.blocks[0].attn, self.norm_f.weight
        dtype = dtype or self.kv_cache_dtype
        # sliding-window layers keep a rolling ring of their globals and last w keys
        windows = [(b.attn.window, b.attn.n_global)
                   if b.attn.backend == "sliding_window" and not b.attn.global_stride else None
                   for b in self.blocks]  # strided globals grow with the sequence: a full row
        return KVCache(len(self.blocks), batch_size, attn.n_kv_head, max_len or self.config.block_size,
                       attn.head_dim, dtype=dtype or p.dtype, device=p.device, windows=windows)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                document_ids: torch.Tensor | None = None) -> LMOutput:
        """`logits_to_keep` > 0 computes the logits of the last that many positions only (generation
        needs the last one: the output layer is a sixth of a 135M model's prefill FLOPs).

        With `kv_cache` every row continues its own cached sequence (lmlab/nn/kv_cache.py: each row has
        its own length and position); `attention_mask` then covers the new tokens ([B, T]) or, as
        `transformers` passes it, every token so far ([B, length + T], rows of equal length).

        `document_ids` ([B, T], a run of equal ids per document) packs several documents into a row, as
        SFT packs conversations (lmlab/data/chat.py): no token attends across documents and positions
        restart at each one, so each document's logits are those it has alone."""
        B, T = input_ids.shape
        if document_ids is not None:
            self._check_packing(document_ids, input_ids, kv_cache)
            if position_ids is None:
                position_ids = position_ids_from_documents(document_ids)
        if kv_cache is not None:
            past = kv_cache.pos
            new = key_mask = None
            if attention_mask is not None:
                new = attention_mask.to(torch.bool)
                if past and new.shape == (B, past + T):  # transformers-style mask over all tokens so far
                    new = new[:, past:]
                if new.shape != (B, T):
                    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                     f"{(B, T)}" + (f" or {(B, past + T)}" if past else ""))
            key_mask = new
            step = kv_cache.begin(T, new)
            if int(kv_cache.positions.max()) + T > self.config.block_size:
                kv_cache.step = None
                raise ValueError(f"sequence of {int(kv_cache.positions.max()) + T} tokens exceeds block_size "
                                 f"{self.config.block_size}")
            if position_ids is None:
                position_ids = step.position_ids
            attn_mask = None  # the cache's step carries it
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            key_mask = None
            if attention_mask is not None:
                if attention_mask.shape != (B, T):
                    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, T)}")
                key_mask = attention_mask.to(torch.bool)
                if bool(key_mask.all()):
                    key_mask = None  # keeps the fast causal path
            if position_ids is None:
                position_ids = (torch.arange(T, device=input_ids.device)[None] if key_mask is None
                                else position_ids_from_mask(key_mask))
            attn_mask = padding_mask(key_mask, T) if key_mask is not None else None
            if document_ids is not None:
                docs = document_mask(document_ids)
                attn_mask = docs if attn_mask is None else attn_mask & docs
        x = self.drop(self.embed(input_ids, position_ids))
        attn_kw = {"kv_cache": kv_cache, "rotary": self.rotary(position_ids), "attn_mask": attn_mask}
        if kv_cache is None and key_mask is not None:
            attn_kw["key_mask"] = key_mask  # for backends that never build a [T, T] mask
        for i, block in enumerate(self.blocks):
            x = block(x, layer_idx=i, **attn_kw)
        if kv_cache is not None:
            kv_cache.commit()
        moe = self._moe_outputs(key_mask) if self.moe_layers() else {}
        x = self.norm_f(x)
        if targets is not None and self.config.loss_chunk_size > 0:
            # training: the loss without materialising the logits (see lmlab/nn/loss.py)
            loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                        chunk_size=self.config.loss_chunk_size)
            return LMOutput(logits=None, loss=loss, **moe)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep > 0 else x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, **moe)

    def _check_packing(self, document_ids: torch.Tensor, input_ids: torch.Tensor, kv_cache: KVCache | None) -> None:
        if kv_cache is not None:
            raise ValueError("document_ids (packed documents) are for training and scoring, not with a KV cache")
        if document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}; expected {tuple(input_ids.shape)}")
        if any(b.attn.backend == "sliding_window" for b in self.blocks):
            raise ValueError("packed documents need the eager or sdpa attention backend (the sliding-window "
                             "kernel builds no [T, T] mask)")

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def _moe_outputs(self, key_mask: torch.Tensor | None) -> dict:
        """The MoE layers' router logits, expert load and auxiliary loss (lmlab/nn/moe.py) for LMOutput;
        padding (`key_mask` False) is left out of the losses."""
        c, layers = self.config, self.moe_layers()
        logits = [m.router_logits for m in layers]
        aux = c.moe_aux_loss_coef * load_balancing_loss(logits, c.n_expert_per_token, key_mask,
                                                           pooled=c.moe_aux_pooled)
        if c.moe_z_loss_coef > 0:
            aux = aux + c.moe_z_loss_coef * router_z_loss(logits, key_mask)
        load = torch.stack([m.load for m in layers]).float()
        return {"aux_loss": aux, "router_logits": tuple(logits), "expert_load": load / load.sum(-1, keepdim=True)}
