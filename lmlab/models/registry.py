"""Model families and presets by name: `build(config)` and `preset(name)`.

A family is a (config class, model class) pair; a preset is a named config. Adding a family means
adding its file and one line here.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.gpt import GPT, GPTConfig

FAMILIES: dict[str, type[nn.Module]] = {"gpt": GPT}

PRESETS: dict[str, ModelConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LmlabError(f"unknown model preset '{name}'. Presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def build(config: ModelConfig) -> nn.Module:
    if config.family not in FAMILIES:
        raise LmlabError(f"unknown model family '{config.family}'. Known: {', '.join(FAMILIES)}")
    return FAMILIES[config.family](config)
