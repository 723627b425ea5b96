"""Hugging Face adapter: BART (BartForConditionalGeneration)."""

from __future__ import annotations

import re

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import Adapter, Param, get, register, unsupported
from lmlab.io.hf.bert import ACTIVATIONS
from lmlab.models.transformer.bart import BartConfig


def config_from_hf(hf: dict) -> BartConfig:
    act = get(hf, "activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise unsupported(hf, "activation_function", act)
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if get(hf, a) != get(hf, b):
            raise unsupported(hf, b, hf[b])  # lmlab's BART has one width for both stacks
    if not get(hf, "tie_word_embeddings", True):
        raise unsupported(hf, "tie_word_embeddings", False)
    return BartConfig(vocab_size=get(hf, "vocab_size"), block_size=get(hf, "max_position_embeddings"),
                      n_layer=get(hf, "encoder_layers"), n_dec_layer=get(hf, "decoder_layers"),
                      n_head=get(hf, "encoder_attention_heads"), n_embd=get(hf, "d_model"),
                      mlp_hidden=get(hf, "encoder_ffn_dim"), activation=ACTIVATIONS[act],
                      dropout=get(hf, "dropout", 0.1), scale_embedding=get(hf, "scale_embedding", False),
                      init_std=get(hf, "init_std", 0.02), pad_id=get(hf, "pad_token_id", 1),
                      eos_id=get(hf, "eos_token_id", 2), decoder_start_id=get(hf, "decoder_start_token_id", 2))


def config_to_hf(c: BartConfig) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(c.activation)
    if act is None:
        raise LmlabError(f"BART activation '{c.activation}' has no transformers equivalent")
    return {"vocab_size": c.vocab_size, "max_position_embeddings": c.block_size, "d_model": c.n_embd,
            "encoder_layers": c.n_layer, "decoder_layers": c.n_dec_layer, "encoder_attention_heads": c.n_head,
            "decoder_attention_heads": c.n_head, "encoder_ffn_dim": c.mlp_hidden, "decoder_ffn_dim": c.mlp_hidden,
            "activation_function": act, "dropout": c.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0,
            "scale_embedding": c.scale_embedding, "init_std": c.init_std, "tie_word_embeddings": True,
            "pad_token_id": c.pad_id, "eos_token_id": c.eos_id, "decoder_start_token_id": c.decoder_start_id,
            "forced_eos_token_id": None, "forced_bos_token_id": None, "is_encoder_decoder": True}


def params(c: BartConfig) -> list[Param]:
    out = [Param("wte.weight", ("model.shared.weight",)), Param("final_logits_bias", ("final_logits_bias",))]
    for side, n in (("enc", c.n_layer), ("dec", c.n_dec_layer)):
        stack = f"model.{side}oder"
        out.append(Param(f"{side}_wpe.weight", (f"{stack}.embed_positions.weight",)))
        for wb in ("weight", "bias"):
            out.append(Param(f"{side}_norm_emb.{wb}", (f"{stack}.layernorm_embedding.{wb}",)))
        for i in range(n):
            h, ours = f"{stack}.layers.{i}", f"{side}_blocks.{i}"
            attns = (("attn", "self_attn"), ("cross", "encoder_attn")) if side == "dec" else (("attn", "self_attn"),)
            for wb in ("weight", "bias"):
                for a, theirs in attns:
                    out += [Param(f"{ours}.{a}.qkv.{wb}", tuple(f"{h}.{theirs}.{p}_proj.{wb}" for p in "qkv"),
                                  sizes=(c.n_embd,) * 3),
                            Param(f"{ours}.{a}.proj.{wb}", (f"{h}.{theirs}.out_proj.{wb}",))]
                out += [Param(f"{ours}.norm1.{wb}", (f"{h}.self_attn_layer_norm.{wb}",)),
                        Param(f"{ours}.mlp.up.{wb}", (f"{h}.fc1.{wb}",)),
                        Param(f"{ours}.mlp.down.{wb}", (f"{h}.fc2.{wb}",)),
                        Param(f"{ours}.norm2.{wb}", (f"{h}.final_layer_norm.{wb}",))]
                if side == "dec":
                    out.append(Param(f"{ours}.norm_cross.{wb}", (f"{h}.encoder_attn_layer_norm.{wb}",)))
    return out


# the encoder's and decoder's token tables are `model.shared` again
ADAPTER = register(Adapter(
    "bart", "bart", "BartForConditionalGeneration", config_from_hf, config_to_hf, params,
    ignore=re.compile(r"^model\.(en|de)coder\.embed_tokens\.weight$")))
