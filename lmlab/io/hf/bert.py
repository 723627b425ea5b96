"""Hugging Face adapter: BERT (BertForMaskedLM)."""

from __future__ import annotations

import re

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import Adapter, Param, get, register, unsupported
from lmlab.models.transformer.bert import BertConfig

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def config_from_hf(hf: dict) -> BertConfig:
    act = get(hf, "hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise unsupported(hf, "hidden_act", act)
    for key, ok in (("position_embedding_type", "absolute"), ("is_decoder", False), ("add_cross_attention", False),
                    ("tie_word_embeddings", True)):
        if get(hf, key, ok) != ok:
            raise unsupported(hf, key, hf[key])
    return BertConfig(vocab_size=get(hf, "vocab_size"), block_size=get(hf, "max_position_embeddings"),
                      n_layer=get(hf, "num_hidden_layers"), n_head=get(hf, "num_attention_heads"),
                      n_embd=get(hf, "hidden_size"), mlp_hidden=get(hf, "intermediate_size"),
                      type_vocab_size=get(hf, "type_vocab_size", 2), activation=ACTIVATIONS[act],
                      norm_eps=get(hf, "layer_norm_eps", 1e-12), dropout=get(hf, "hidden_dropout_prob", 0.1),
                      init_std=get(hf, "initializer_range", 0.02), pad_id=get(hf, "pad_token_id", 0))


def config_to_hf(c: BertConfig) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(c.activation)
    if act is None:
        raise LmlabError(f"BERT activation '{c.activation}' has no transformers equivalent")
    if c.type_vocab_size < 1:
        raise LmlabError("transformers' BERT needs token-type embeddings (type_vocab_size >= 1)")
    return {"vocab_size": c.vocab_size, "max_position_embeddings": c.block_size, "hidden_size": c.n_embd,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "intermediate_size": c.mlp_hidden,
            "type_vocab_size": c.type_vocab_size, "hidden_act": act, "layer_norm_eps": c.norm_eps,
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
            "initializer_range": c.init_std, "position_embedding_type": "absolute", "tie_word_embeddings": True,
            "pad_token_id": c.pad_id}


def params(c: BertConfig) -> list[Param]:
    e = "bert.embeddings"
    out = [Param("wte.weight", (f"{e}.word_embeddings.weight",)),
           Param("wpe.weight", (f"{e}.position_embeddings.weight",))]
    if c.type_vocab_size > 0:
        out.append(Param("wtt.weight", (f"{e}.token_type_embeddings.weight",)))
    out += [Param("norm_emb.weight", (f"{e}.LayerNorm.weight",)), Param("norm_emb.bias", (f"{e}.LayerNorm.bias",))]
    for i in range(c.n_layer):
        h = f"bert.encoder.layer.{i}"
        for wb in ("weight", "bias"):
            qkv = tuple(f"{h}.attention.self.{p}.{wb}" for p in ("query", "key", "value"))
            out += [Param(f"blocks.{i}.attn.qkv.{wb}", qkv, sizes=(c.n_embd,) * 3),
                    Param(f"blocks.{i}.attn.proj.{wb}", (f"{h}.attention.output.dense.{wb}",)),
                    Param(f"blocks.{i}.norm1.{wb}", (f"{h}.attention.output.LayerNorm.{wb}",)),
                    Param(f"blocks.{i}.mlp.up.{wb}", (f"{h}.intermediate.dense.{wb}",)),
                    Param(f"blocks.{i}.mlp.down.{wb}", (f"{h}.output.dense.{wb}",)),
                    Param(f"blocks.{i}.norm2.{wb}", (f"{h}.output.LayerNorm.{wb}",))]
    for wb in ("weight", "bias"):
        out += [Param(f"head_dense.{wb}", (f"cls.predictions.transform.dense.{wb}",)),
                Param(f"head_norm.{wb}", (f"cls.predictions.transform.LayerNorm.{wb}",))]
    out.append(Param("lm_head.bias", ("cls.predictions.bias",)))
    return out


def normalize(key: str) -> str:
    # the decoder weight is the (tied) word embedding: spelt as the tied output layer, which is dropped
    return "lm_head.weight" if key == "cls.predictions.decoder.weight" else key


# the decoder bias is `cls.predictions.bias` again; the pooler and next-sentence head are not an LM
ADAPTER = register(Adapter(
    "bert", "bert", "BertForMaskedLM", config_from_hf, config_to_hf, params,
    ignore=re.compile(r"cls\.predictions\.decoder\.bias$|embeddings\.(position|token_type)_ids$"
                      r"|^bert\.pooler\.|^cls\.seq_relationship\."),
    normalize=normalize))
