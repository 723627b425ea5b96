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
from lmlab.models.transformer.captioner import Captioner, CaptionerConfig
from lmlab.models.transformer.cmlm import CMLM, CMLMConfig
from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.models.transformer.mixtral import Mixtral, MixtralConfig
from lmlab.models.transformer.vit import ViT, ViTConfig


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
    "vit": Family(ViTConfig, ViT),
    "captioner": Family(CaptionerConfig, Captioner),
    "nplm": Family(NPLMConfig, NPLM),
    "ngram": Family(NGramConfig, NGramModel, built=False),
}

def _gpt3(n_layer: int, n_embd: int, n_head: int) -> GPTConfig:
    # GPT-3 (Brown et al. 2020, table 2.1): n_ctx 2048, GPT-2's 50257-token BPE, tied embeddings. Its
    # alternating locally banded sparse attention changes no parameter count.
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257, block_size=2048)


def _llama(n_layer: int, n_embd: int, n_head: int, n_kv_head: int, mlp_hidden: int, vocab_size: int,
           block_size: int, rope_theta: float, cls: type[LlamaConfig] = LlamaConfig) -> LlamaConfig:
    return cls(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, mlp_hidden=mlp_hidden,
               vocab_size=vocab_size, block_size=block_size, rope_theta=rope_theta, tie_embeddings=False)


# published shapes, for `lmlab info --model` (built on the meta device; sizes are counted, never typed)
_PUBLISHED: dict[str, ModelConfig] = {
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-1.3b": _gpt3(24, 2048, 16),   # table 2.1 lists 24 heads of 128; 2048 = 16 x 128
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),    # table 2.1 prints d_model 5140, not a multiple of 40 heads of 128
    "gpt3-175b": _gpt3(96, 12288, 96),
    # Llama 2 (Touvron et al. 2023, table 1; the HF config.json files): 32000-token vocabulary, 4096 context
    "llama2-7b": _llama(32, 4096, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama2-13b": _llama(40, 5120, 40, 40, 13824, 32000, 4096, 10000.0),
    "llama2-70b": _llama(80, 8192, 64, 8, 28672, 32000, 4096, 10000.0),
    # Llama 3 / 3.1 (Grattafiori et al. 2024, table 3): 128256-token vocabulary, RoPE base 500000
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, 128256, 8192, 500000.0),
    "llama3-70b": _llama(80, 8192, 64, 8, 28672, 128256, 8192, 500000.0),
    "llama3.1-405b": _llama(126, 16384, 128, 8, 53248, 128256, 131072, 500000.0),
    # Mixtral 8x7B (Jiang et al. 2024; mistralai/Mixtral-8x7B-v0.1 config.json): Mistral 7B's shape, 8 experts
    "mixtral-8x7b": _llama(32, 4096, 32, 8, 14336, 32000, 32768, 1e6, cls=MixtralConfig),
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
    # ViT (Dosovitskiy et al. 2021): image size, class count and channels come from the prepared data
    "vit-tiny": ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64),
    # 8x8 digits (sklearn's load_digits); docs/vision/ compares patch sizes on validation (4x4 won there)
    "vit-digits": ViTConfig(image_size=8, patch_size=2, n_channels=1, n_layer=4, n_head=4, n_embd=64,
                            mlp_hidden=128, dropout=0.1),
    "vit-b16": ViTConfig(n_classes=1000),  # ViT-Base/16 (table 1 of the paper; google/vit-base-patch16-224)
    "caption-tiny": CaptionerConfig(image_size=16, patch_size=4, n_enc_layer=1, n_layer=1, n_head=2, n_embd=32,
                                    mlp_hidden=64, block_size=16),
    "caption-shapes": CaptionerConfig(image_size=32, patch_size=4, n_enc_layer=2, n_layer=2, n_head=4,
                                      n_embd=128, mlp_hidden=256, block_size=16),
    # SmolLM2-135M's published shape (HuggingFaceTB/SmolLM2-135M config.json): 134,515,008 parameters
    "smollm2-135m": LlamaConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, mlp_hidden=1536,
                                vocab_size=49152, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                                block_size=8192),
    "mixtral-tiny": MixtralConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=128, n_expert=4,
                                  block_size=64),
    **_PUBLISHED,
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
