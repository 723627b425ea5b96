"""Hugging Face adapter: ViT (ViTForImageClassification)."""

from __future__ import annotations

import re

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import Adapter, Param, get, register, unsupported
from lmlab.models.transformer.vit import ViTConfig

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def config_from_hf(hf: dict) -> ViTConfig:
    act = get(hf, "hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise unsupported(hf, "hidden_act", act)
    if not get(hf, "qkv_bias", True):
        raise unsupported(hf, "qkv_bias", False)
    size, patch = get(hf, "image_size", 224), get(hf, "patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise unsupported(hf, "image_size/patch_size", (size, patch))
    id2label = get(hf, "id2label", {})
    n = len(id2label) if id2label else get(hf, "num_labels", 2)
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)] if id2label else []
    return ViTConfig(image_size=size, patch_size=patch, n_channels=get(hf, "num_channels", 3), n_classes=n,
                     labels=labels, pool="cls", n_layer=get(hf, "num_hidden_layers"),
                     n_head=get(hf, "num_attention_heads"), n_embd=get(hf, "hidden_size"),
                     mlp_hidden=get(hf, "intermediate_size"), activation=ACTIVATIONS[act],
                     norm_eps=get(hf, "layer_norm_eps", 1e-12), dropout=get(hf, "hidden_dropout_prob", 0.0),
                     init_std=get(hf, "initializer_range", 0.02))


def config_to_hf(c: ViTConfig) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}.get(c.activation)
    if act is None:
        raise LmlabError(f"ViT activation '{c.activation}' has no transformers equivalent")
    if c.pool != "cls" or c.n_classes < 1:
        raise LmlabError("transformers' ViTForImageClassification reads a class token into a head: "
                         "export a ViT with pool='cls' and n_classes >= 1")
    labels = c.labels or [f"LABEL_{i}" for i in range(c.n_classes)]
    return {"image_size": c.image_size, "patch_size": c.patch_size, "num_channels": c.n_channels,
            "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "intermediate_size": c.mlp_hidden, "hidden_act": act, "layer_norm_eps": c.norm_eps,
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
            "initializer_range": c.init_std, "qkv_bias": True,
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def params(c: ViTConfig) -> list[Param]:
    e = "vit.embeddings"
    out = [Param("cls_token", (f"{e}.cls_token",)), Param("pos_embed", (f"{e}.position_embeddings",))]
    for i in range(c.n_layer):
        h = f"vit.encoder.layer.{i}"
        for wb in ("weight", "bias"):
            qkv = tuple(f"{h}.attention.attention.{p}.{wb}" for p in ("query", "key", "value"))
            out += [Param(f"blocks.{i}.norm1.{wb}", (f"{h}.layernorm_before.{wb}",)),
                    Param(f"blocks.{i}.attn.qkv.{wb}", qkv, sizes=(c.n_embd,) * 3),
                    Param(f"blocks.{i}.attn.proj.{wb}", (f"{h}.attention.output.dense.{wb}",)),
                    Param(f"blocks.{i}.norm2.{wb}", (f"{h}.layernorm_after.{wb}",)),
                    Param(f"blocks.{i}.mlp.up.{wb}", (f"{h}.intermediate.dense.{wb}",)),
                    Param(f"blocks.{i}.mlp.down.{wb}", (f"{h}.output.dense.{wb}",))]
    for wb in ("weight", "bias"):
        out += [Param(f"patch.proj.{wb}", (f"{e}.patch_embeddings.projection.{wb}",)),
                Param(f"norm_f.{wb}", (f"vit.layernorm.{wb}",)), Param(f"head.{wb}", (f"classifier.{wb}",))]
    return out


# transformers 5 names the modules in memory differently from the files it saves (and from every ViT
# on the Hub), which keep the names below; keys spelt the new way are read as their file names
_RENAMES = [(re.compile(r"^vit\.layers\.(\d+)\."), r"vit.encoder.layer.\1."),
            (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
            (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
            (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
            (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
            (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
            (re.compile(r"\.mlp\.fc2\."), ".output.dense.")]


def normalize(key: str) -> str:
    if key.startswith("vit.layers."):
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
    return key


# the pooler (ViTModel's add_pooling_layer) is not read by the classifier; the mask token is for
# masked-image modelling only
ADAPTER = register(Adapter("vit", "vit", "ViTForImageClassification", config_from_hf, config_to_hf, params,
                           ignore=re.compile(r"^vit\.pooler\.|^vit\.embeddings\.mask_token$"), normalize=normalize))
