"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"): Llama whose feed-forward is a sparse MoE.

Every layer's SwiGLU MLP is replaced by 8 SwiGLU experts of which the router picks 2 per token, their
outputs weighted by the renormalised top-2 softmax (lmlab/nn/moe.py). The attention, RoPE, RMSNorm
and GQA are Llama's; the family exists for its defaults and its HF/GGUF layouts. Any Llama or GPT
config becomes MoE the same way, through the `n_expert` fields of `MoEConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.models.transformer.llama import Llama, LlamaConfig


@dataclass(kw_only=True)
class MixtralConfig(LlamaConfig):
    family: str = "mixtral"
    n_expert: int = 8               # Mixtral 8x7B: 8 experts per layer, 2 active per token
    n_expert_per_token: int = 2
    rope_theta: float = 1e6         # Mixtral 8x7B's config.json
    moe_aux_pooled: bool = True     # the auxiliary loss as transformers' MixtralForCausalLM computes it


class Mixtral(Llama):
    config_class = MixtralConfig

    def __init__(self, config: MixtralConfig):
        if config.n_expert <= 0:
            raise ValueError("a Mixtral config needs n_expert > 0 (a dense one is a Llama)")
        super().__init__(config)
