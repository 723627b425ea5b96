"""BART (Lewis et al. 2020): a denoising encoder-decoder Transformer.

A bidirectional encoder reads the corrupted text (lmlab/data/denoise.py); a causal decoder with
cross-attention over the encoder's output reconstructs the original. Both stacks share one token
embedding (also the output layer), have learned positions with BART's offset of 2 (fairseq reserves
the first rows of the table), a LayerNorm on the embeddings ("layernorm_embedding") and post-norm
blocks (lmlab/nn/block.py with post_norm). The output adds `final_logits_bias`, as transformers does.

Inference state lives outside the model: `encode` once, `cross_kv` once per input (the encoder's
keys/values for every decoder layer), then `decode` step by step with a KVCache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig, count_params, init_normal
from lmlab.nn.attention import padding_mask
from lmlab.nn.block import Block
from lmlab.nn.kv_cache import KVCache

POS_OFFSET = 2  # BART/fairseq learned positions: position p uses row p + 2 of the table


@dataclass(kw_only=True)
class BartConfig(ModelConfig):
    family: str = "bart"
    n_layer: int = 6               # encoder layers
    n_dec_layer: int = 6           # decoder layers
    n_head: int = 6
    n_embd: int = 384
    mlp_hidden: int = 1536
    activation: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.1
    scale_embedding: bool = False  # multiply token embeddings by sqrt(n_embd) (mBART)
    init_std: float = 0.02
    tie_embeddings: bool = True    # always: encoder, decoder and output share one table
    pad_id: int = 0                # lmlab tokenizers: <pad> = 0, </s> = 3 (lmlab/tokenizers/base.py)
    eos_id: int = 3
    decoder_start_id: int = 3      # BART starts decoding from </s>


def shift_right(targets: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: [start, y_0, ..., y_{T-2}], with ignored targets (-100) as pad."""
    out = torch.full_like(targets, start_id)
    out[:, 1:] = targets[:, :-1]
    return out.masked_fill(out == -100, pad_id)


class BART(nn.Module):
    config_class = BartConfig
    objective = "denoise"  # picks the training-batch collator (lmlab/data/objectives.py)
    causal_decoder = True  # False: a bidirectional decoder (the conditional masked LM, models/cmlm.py)

    def __init__(self, config: BartConfig):
        super().__init__()
        c = config
        if c.vocab_size <= 0:
            raise ValueError("BartConfig.vocab_size must be set (it comes from the tokenizer)")
        if not c.tie_embeddings:
            raise ValueError("BART always shares its embeddings with the output layer")
        self.config = c
        self.embed_scale = math.sqrt(c.n_embd) if c.scale_embedding else 1.0
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, padding_idx=c.pad_id)  # <pad> gets no gradient
        self.enc_wpe = nn.Embedding(c.block_size + POS_OFFSET, c.n_embd)
        self.dec_wpe = nn.Embedding(c.block_size + POS_OFFSET, c.n_embd)
        self.enc_norm_emb = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.dec_norm_emb = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        opts = {"mlp_hidden": c.mlp_hidden, "activation": c.activation, "norm_eps": c.norm_eps,
                "dropout": c.dropout, "post_norm": True}
        self.enc_blocks = nn.ModuleList(Block(c.n_embd, c.n_head, causal=False, **opts) for _ in range(c.n_layer))
        self.dec_blocks = nn.ModuleList(Block(c.n_embd, c.n_head, causal=self.causal_decoder, cross_attention=True,
                                              **opts) for _ in range(c.n_dec_layer))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, c.vocab_size))
        init_normal(self, self.config.init_std)
        self.lm_head.weight = self.wte.weight


    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding, (self.wte, self.enc_wpe, self.dec_wpe))

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """The decoder's self-attention cache (cross-attention keys/values come from `cross_kv`)."""
        attn, p = self.dec_blocks[0].attn, self.wte.weight
        return KVCache(len(self.dec_blocks), batch_size, attn.n_kv_head, max_len or self.config.block_size,
                       attn.head_dim, dtype=dtype or p.dtype, device=p.device)

    def _embed(self, ids: torch.Tensor, wpe: nn.Embedding, norm: nn.Module, start: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=ids.device) + POS_OFFSET
        return self.drop(norm(self.wte(ids) * self.embed_scale + wpe(pos)[None]))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output [B, S, n_embd] (pads, where `attention_mask` is 0, are not attended)."""
        x = self._embed(input_ids, self.enc_wpe, self.enc_norm_emb)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask.to(torch.bool), input_ids.shape[1])
        for block in self.enc_blocks:
            x = block(x, attn_mask=mask)
        return x

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys/values over the encoder output (once per input)."""
        return [block.cross.cross_kv(memory) for block in self.dec_blocks]

    def decode(self, decoder_input_ids: torch.Tensor, cross_kv: list[tuple[torch.Tensor, torch.Tensor]], *,
               attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
               decoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `decoder_input_ids` (continuing the cache, if given); `attention_mask` is the
        encoder's padding mask, `decoder_mask` the decoder inputs' own (for a bidirectional decoder)."""
        past = 0
        if kv_cache is not None:  # every row (beam) of a BART decode has the same length
            past = kv_cache.uniform()
            if past is None:
                raise ValueError("BART decodes rows of one length: the KV cache's rows differ")
            kv_cache.begin(decoder_input_ids.shape[1])
        x = self._embed(decoder_input_ids, self.dec_wpe, self.dec_norm_emb, start=past)
        cross_mask = self_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            cross_mask = attention_mask.to(torch.bool)[:, None, None, :]
        if decoder_mask is not None and not bool(decoder_mask.all()):
            self_mask = padding_mask(decoder_mask.to(torch.bool), decoder_input_ids.shape[1])
        for i, block in enumerate(self.dec_blocks):
            x = block(x, layer_idx=i, kv_cache=kv_cache, attn_mask=self_mask, cross_kv=cross_kv[i],
                      cross_mask=cross_mask)
        if kv_cache is not None:
            kv_cache.commit()
        return self.lm_head(x) + self.final_logits_bias

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> LMOutput:
        """Training: `input_ids` corrupted, `targets` the original (-100 = ignored); the decoder reads the
        targets shifted right. Scoring: pass `decoder_input_ids`."""
        c = self.config
        if decoder_input_ids is None:
            if targets is None:
                raise ValueError("BART needs decoder_input_ids or targets")
            decoder_input_ids = shift_right(targets, c.decoder_start_id, c.pad_id)
        memory = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, self.cross_kv(memory), attention_mask=attention_mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss)

