"""Hugging Face adapter: GPT-2 (GPT2LMHeadModel)."""

from __future__ import annotations

import re

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import Adapter, Param, get, register, unsupported
from lmlab.models.transformer.gpt import GPTConfig

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict) -> GPTConfig:
    n_embd = get(hf, "n_embd")
    act = get(hf, "activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise unsupported(hf, "activation_function", act)
    if get(hf, "n_inner", 4 * n_embd) != 4 * n_embd:
        raise unsupported(hf, "n_inner", hf["n_inner"])
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if get(hf, key, ok) != ok:
            raise unsupported(hf, key, hf[key])
    return GPTConfig(vocab_size=get(hf, "vocab_size"), block_size=get(hf, "n_positions"),
                     n_layer=get(hf, "n_layer"), n_head=get(hf, "n_head"), n_embd=n_embd,
                     activation=ACTIVATIONS[act], norm_eps=get(hf, "layer_norm_epsilon", 1e-5),
                     dropout=get(hf, "resid_pdrop", 0.0), attn_dropout=get(hf, "attn_pdrop", None),
                     tie_embeddings=get(hf, "tie_word_embeddings", True),
                     init_std=get(hf, "initializer_range", 0.02), bias=True)


def config_to_hf(c: GPTConfig) -> dict:
    if c.position != "learned":
        raise LmlabError(f"GPT-2 has learned positions; a GPT with position={c.position!r} has no "
                         "transformers equivalent")
    if not c.bias:
        raise LmlabError("GPT-2 has biases; a GPT with bias=False has no transformers equivalent")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(c.activation)
    if act is None:
        raise LmlabError(f"GPT activation '{c.activation}' has no GPT-2 equivalent")
    return {"vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": None, "activation_function": act, "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout if c.attn_dropout is None else c.attn_dropout,
            "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings}


def params(c: GPTConfig) -> list[Param]:
    out = [Param("wte.weight", ("transformer.wte.weight",)), Param("wpe.weight", ("transformer.wpe.weight",))]
    for i in range(c.n_layer):
        h = f"transformer.h.{i}"
        for ours, theirs, conv in (("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                   ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                                   ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
            out.append(Param(f"blocks.{i}.{ours}.weight", (f"{h}.{theirs}.weight",), conv1d=conv))
            out.append(Param(f"blocks.{i}.{ours}.bias", (f"{h}.{theirs}.bias",)))
    out += [Param("norm_f.weight", ("transformer.ln_f.weight",)), Param("norm_f.bias", ("transformer.ln_f.bias",))]
    if not c.tie_embeddings:
        out.append(Param("lm_head.weight", ("lm_head.weight",)))
    return out


def normalize(key: str) -> str:
    # checkpoints saved from GPT2Model (e.g. the original "gpt2") have no "transformer." prefix
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


ADAPTER = register(Adapter(
    "gpt", "gpt2", "GPT2LMHeadModel", config_from_hf, config_to_hf, params,
    ignore=re.compile(r"\.attn\.(bias|masked_bias)$"),
    normalize=normalize))
