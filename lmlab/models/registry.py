"""Model families and presets by name: `build(config)` and `preset(name)`.

A family is a (config class, model class) pair; a preset is a named config. Adding a family means
adding its file and one line here.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.bart import BART, BartConfig
from lmlab.models.bert import BERT, BertConfig
from lmlab.models.cmlm import CMLM, CMLMConfig
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.llama import Llama, LlamaConfig
from lmlab.models.nplm import NPLM, NPLMConfig

FAMILIES: dict[str, type[nn.Module]] = {"gpt": GPT, "llama": Llama, "bert": BERT, "bart": BART, "nplm": NPLM,
                                       "cmlm": CMLM}

PRESETS: dict[str, ModelConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "llama-tiny": LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=176, block_size=64),
    "llama-mini": LlamaConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=352, block_size=128),
    "bert-tiny": BertConfig(n_layer=2, n_head=2, n_embd=64, mlp_hidden=256, block_size=64),
    "bart-tiny": BartConfig(n_layer=2, n_dec_layer=2, n_head=2, n_embd=64, mlp_hidden=256, block_size=64),
    "cmlm-tiny": CMLMConfig(n_layer=2, n_dec_layer=2, n_head=2, n_embd=64, mlp_hidden=256, block_size=64),
    # SmolLM2-135M's published shape (HuggingFaceTB/SmolLM2-135M config.json): 134,515,008 parameters
    "smollm2-135m": LlamaConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, mlp_hidden=1536,
                                vocab_size=49152, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                                block_size=8192),
    # Bengio et al. 2003 (n = 5, m = 30-100 features, h = 50-100 hidden units, direct connections)
    "nplm": NPLMConfig(context=4, n_embd=64, hidden=256, block_size=64),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LmlabError(f"unknown model preset '{name}'. Presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def build(config: ModelConfig) -> nn.Module:
    if config.family not in FAMILIES:
        raise LmlabError(f"unknown model family '{config.family}'. Known: {', '.join(FAMILIES)}")
    return FAMILIES[config.family](config)
