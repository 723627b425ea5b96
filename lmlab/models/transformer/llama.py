"""Llama (Touvron et al. 2023): the decoder of GPT with RMSNorm, SwiGLU, RoPE and no biases.
Qwen2 (Yang et al. 2024) is this model with biases on the query/key/value projections (`qkv_bias`).

Pre-RMSNorm blocks (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020), rotary position embeddings
(Su et al. 2021; half-split layout as in Hugging Face Llama) and grouped-query attention (Ainslie et
al. 2023) with `n_kv_head` key/value heads shared by `n_head / n_kv_head` query heads each. The
embedding -> blocks -> norm -> head -> loss path is shared with GPT (lmlab/models/transformer/decoder.py).

RoPE has no position table, so `block_size` only bounds the KV cache and training windows; the
generation engine slides a longer context by re-prefilling the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.models.base import ModelConfig
from lmlab.models.transformer.decoder import AttentionConfig, DecoderLM
from lmlab.nn.moe import MoEConfig
from lmlab.nn.position import RotaryEmbedding


@dataclass(kw_only=True)
class LlamaConfig(MoEConfig, AttentionConfig, ModelConfig):
    family: str = "llama"
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 2            # key/value heads (GQA); n_head for plain multi-head attention
    n_embd: int = 384
    mlp_hidden: int = 1024        # SwiGLU width ("intermediate_size"); ~8/3 n_embd keeps GELU's cost
    rope_theta: float = 10000.0   # RoPE base (Su et al. 2021); Llama 3 uses 500000
    # RoPE scaling as Hugging Face spells it (lmlab/nn/position.py), e.g. {"rope_type": "llama3",
    # "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False        # biases on the query/key/value projections (Qwen2), none elsewhere
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    loss_chunk_size: int = 512    # positions per chunk of the fused output-layer loss (0: plain logits)


class Llama(DecoderLM):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        super().__init__(config, norm="rmsnorm",
                         block={"n_kv_head": config.n_kv_head, "mlp_hidden": config.mlp_hidden,
                                "activation": "swiglu", "bias": False})
        self.rope = RotaryEmbedding(config.n_embd // config.n_head, config.rope_theta, config.rope_scaling,
                                    max_position=config.block_size)

    def rotary(self, position_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.rope.rotary(position_ids)
