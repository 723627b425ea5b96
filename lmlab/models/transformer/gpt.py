"""GPT (Radford et al. 2018, 2019): a decoder-only Transformer with learned positions.

Pre-LayerNorm blocks, GELU MLP, tied input/output embeddings, causal SDPA attention. Weights start
at N(0, 0.02) with the residual projections scaled by 1/sqrt(2 * n_layer), as in GPT-2. Everything
but the config and the block options is shared with the other decoders (lmlab/models/transformer/decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmlab.models.base import ModelConfig
from lmlab.models.transformer.decoder import AttentionConfig, DecoderLM
from lmlab.nn.moe import MoEConfig


@dataclass(kw_only=True)
class GPTConfig(MoEConfig, AttentionConfig, ModelConfig):
    family: str = "gpt"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    # dropout on the attention probabilities (GPT-2's attn_pdrop); None = `dropout`. 0 keeps the causal fast
    # paths, which attention-probability dropout turns off (on CPU it cost 30% of a 4 x 192 step's speed).
    attn_dropout: float | None = None
    bias: bool = True
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    loss_chunk_size: int = 512  # positions per chunk of the fused output-layer loss (0: plain logits)
    position: str = "learned"   # learned (GPT-2's table) | alibi (Press et al. 2022: biases, no table)


class GPT(DecoderLM):
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        if config.position not in ("learned", "alibi"):
            raise ValueError(f"GPT position must be 'learned' or 'alibi', not '{config.position}'")
        wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        super().__init__(config, norm="layernorm", wpe=wpe,
                         block={"activation": config.activation, "bias": config.bias,
                                "attn_dropout": config.attn_dropout})
