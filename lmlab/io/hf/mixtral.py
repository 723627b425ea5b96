"""Hugging Face adapter: Mixtral (MixtralForCausalLM).

Weights follow transformers >= 5, which stacks each layer's experts: `mlp.gate.weight` [E, H] (the
router), `mlp.experts.gate_up_proj` [E, 2I, H] ([gate | up], as our SwiGLU) and `mlp.experts.down_proj`
[E, H, I]: the same tensors as lmlab's MoE (lmlab/nn/moe.py). Checkpoints on the Hub (Mixtral-8x7B)
keep the older per-expert layout `block_sparse_moe.experts.{j}.w1|w3|w2` (gate, up, down) and
`block_sparse_moe.gate`; `_stack_experts` turns it into the stacked one on import. Export writes the
stacked layout, which transformers >= 5 reads.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from lmlab.io.hf import llama
from lmlab.io.hf.adapter import Adapter, Param, get, register, unsupported
from lmlab.models.transformer.mixtral import MixtralConfig

_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def config_from_hf(hf: dict) -> MixtralConfig:
    if get(hf, "sliding_window", None) is not None and hf["sliding_window"] < get(hf, "max_position_embeddings"):
        raise unsupported(hf, "sliding_window", hf["sliding_window"])
    base = {f.name: getattr(llama.config_from_hf(hf), f.name) for f in dataclasses.fields(MixtralConfig)
            if f.name != "family"}
    return MixtralConfig(**{**base, "n_expert": get(hf, "num_local_experts"),
                            "n_expert_per_token": get(hf, "num_experts_per_tok"),
                            "moe_aux_loss_coef": get(hf, "router_aux_loss_coef", 0.01),
                            "moe_aux_pooled": True,  # transformers' load_balancing_loss_func
                            "moe_z_loss_coef": 0.0})  # Mixtral trains without a z-loss


def config_to_hf(c: MixtralConfig) -> dict:
    if c.moe_every != 1 or c.moe_shared_hidden or c.moe_capacity_factor or not c.moe_norm_topk or \
            (c.moe_hidden and c.moe_hidden != c.mlp_hidden):
        raise unsupported({"model_type": "mixtral"}, "MoE options", "beyond Mixtral's")
    return {**llama.config_to_hf(c), "num_local_experts": c.n_expert, "num_experts_per_tok": c.n_expert_per_token,
            "router_aux_loss_coef": c.moe_aux_loss_coef, "router_jitter_noise": 0.0, "sliding_window": None}


def params(c: MixtralConfig) -> list[Param]:
    out = [p for p in llama.params(c) if ".mlp." not in p.ours]
    for i in range(c.n_layer):
        h = f"model.layers.{i}.mlp"
        out += [Param(f"blocks.{i}.mlp.router.weight", (f"{h}.gate.weight",)),
                Param(f"blocks.{i}.mlp.experts_up", (f"{h}.experts.gate_up_proj",)),
                Param(f"blocks.{i}.mlp.experts_down", (f"{h}.experts.down_proj",))]
    return out


def _stack_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub's per-expert layout -> the stacked one (a state dict already stacked passes through)."""
    out, experts = {}, {}
    for k, v in sd.items():
        m = _EXPERT.match(k)
        if m:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = v
        else:
            out[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
    for layer, ws in experts.items():
        n = 1 + max(j for j, _ in ws)
        gate_up = [torch.cat([ws[j, "w1"], ws[j, "w3"]]) for j in range(n)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([ws[j, "w2"] for j in range(n)])
    return out


ADAPTER = register(Adapter(
    "mixtral", "mixtral", "MixtralForCausalLM", config_from_hf, config_to_hf, params,
    ignore=re.compile(r"rotary_emb\.inv_freq$"), prepare=_stack_experts))
