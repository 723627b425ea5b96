"""The one model registry: families and presets by name, `build(config)` and `preset(name)`.

A family is a (config class, model class) pair; a preset is a named config. Adding a family means
adding its file and one line here. A config read from YAML picks its class here by its `family` key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.ngram.model import NGramConfig, NGramModel
from lmlab.models.nplm import NPLM, NPLMConfig
from lmlab.models.transformer.bart import BART, BartConfig
from lmlab.models.transformer.bert import BERT, BertConfig
from lmlab.models.transformer.cmlm import CMLM, CMLMConfig
from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.models.transformer.mixtral import Mixtral, MixtralConfig


@dataclass(frozen=True)
class Family:
    config: type[ModelConfig]
    model: type
    built: bool = True  # False: estimated from data by the model's own constructors (n-gram counts)


FAMILIES: dict[str, Family] = {
    "gpt": Family(GPTConfig, GPT),
    "llama": Family(LlamaConfig, Llama),
    "mixtral": Family(MixtralConfig, Mixtral),
    "bert": Family(BertConfig, BERT),
    "bart": Family(BartConfig, BART),
    "cmlm": Family(CMLMConfig, CMLM),
    "nplm": Family(NPLMConfig, NPLM),
    "ngram": Family(NGramConfig, NGramModel, built=False),
}

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


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise LmlabError(f"unknown model family '{name}'. Known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of `config`'s family."""
    fam = family(config.family)
    if not fam.built:
        raise LmlabError(f"'{config.family}' models are estimated from counts, not built empty: use "
                         f"{fam.model.__name__}.from_text / from_ids, or `lmlab ngram build`")
    return fam.model(config)
