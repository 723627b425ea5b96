"""Hugging Face interop: one adapter per family maps configs and weights to and from `transformers`.

An adapter is a config mapping in each direction plus a table of weights: each of our tensors is one
or more HF tensors concatenated along the output dimension (Llama's q/k/v and gate/up go into our
fused Linears), transposed where HF GPT-2 uses `Conv1D` (which stores [in, out]).

Directories hold `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`)
and optionally `tokenizer.json`; weights are read and written as safetensors only (never pickle).
Adding a family means adding its adapter to `ADAPTERS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.registry import build
from lmlab.models.transformer.bart import BartConfig
from lmlab.models.transformer.bert import BertConfig
from lmlab.models.transformer.gpt import GPTConfig
from lmlab.models.transformer.llama import LlamaConfig
from lmlab.tokenizers import Tokenizer, load_tokenizer
from lmlab.utils.atomic import atomic_dir

_REQUIRED = object()


def _get(hf: dict, key: str, default: Any = _REQUIRED) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is _REQUIRED:
        raise LmlabError(f"HF config ({hf.get('model_type')}) lacks the key '{key}'")
    return default


def _unsupported(hf: dict, key: str, value: Any) -> LmlabError:
    return LmlabError(f"HF config ({hf.get('model_type')}): {key}={value!r} is not supported by lmlab")


@dataclass(frozen=True)
class Param:
    """Our tensor `ours` = the HF tensors `theirs` concatenated along dim 0 (each transposed first
    when `conv1d`); `sizes` are their rows, for splitting a fused tensor back."""
    ours: str
    theirs: tuple[str, ...]
    conv1d: bool = False
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Adapter:
    family: str
    model_type: str                                   # config.json "model_type"
    architecture: str                                 # the transformers class that loads it
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[Any], dict]
    params: Callable[[Any], list[Param]]
    ignore: re.Pattern = re.compile(r"$^")           # HF buffers that are not weights
    normalize: Callable[[str], str] = str             # HF key -> its canonical spelling


# ---------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel)

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _gpt2_config_from_hf(hf: dict) -> GPTConfig:
    n_embd = _get(hf, "n_embd")
    act = _get(hf, "activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise _unsupported(hf, "activation_function", act)
    if _get(hf, "n_inner", 4 * n_embd) != 4 * n_embd:
        raise _unsupported(hf, "n_inner", hf["n_inner"])
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if _get(hf, key, ok) != ok:
            raise _unsupported(hf, key, hf[key])
    return GPTConfig(vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "n_positions"),
                     n_layer=_get(hf, "n_layer"), n_head=_get(hf, "n_head"), n_embd=n_embd,
                     activation=_GPT2_ACTIVATIONS[act], norm_eps=_get(hf, "layer_norm_epsilon", 1e-5),
                     dropout=_get(hf, "resid_pdrop", 0.0), tie_embeddings=_get(hf, "tie_word_embeddings", True),
                     init_std=_get(hf, "initializer_range", 0.02), bias=True)


def _gpt2_config_to_hf(c: GPTConfig) -> dict:
    if not c.bias:
        raise LmlabError("GPT-2 has biases; a GPT with bias=False has no transformers equivalent")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(c.activation)
    if act is None:
        raise LmlabError(f"GPT activation '{c.activation}' has no GPT-2 equivalent")
    return {"vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": None, "activation_function": act, "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings}


def _gpt2_params(c: GPTConfig) -> list[Param]:
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


def _gpt2_normalize(key: str) -> str:
    # checkpoints saved from GPT2Model (e.g. the original "gpt2") have no "transformer." prefix
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


# ---------------------------------------------------------------------------------------------
# Llama (LlamaForCausalLM)

def _llama_config_from_hf(hf: dict) -> LlamaConfig:
    n_embd, n_head = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    if _get(hf, "hidden_act", "silu") != "silu":
        raise _unsupported(hf, "hidden_act", hf["hidden_act"])
    for key in ("attention_bias", "mlp_bias"):
        if _get(hf, key, False):
            raise _unsupported(hf, key, hf[key])
    if _get(hf, "head_dim", n_embd // n_head) * n_head != n_embd:
        raise _unsupported(hf, "head_dim", hf["head_dim"])
    # transformers >= 5 keeps the RoPE settings in "rope_parameters", older versions at the top level
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _unsupported(hf, "rope_type", rope.get("rope_type", rope.get("type")))
    return LlamaConfig(vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "max_position_embeddings"),
                       n_layer=_get(hf, "num_hidden_layers"), n_head=n_head,
                       n_kv_head=_get(hf, "num_key_value_heads", n_head), n_embd=n_embd,
                       mlp_hidden=_get(hf, "intermediate_size"),
                       rope_theta=float(rope.get("rope_theta") or _get(hf, "rope_theta", 10000.0)),
                       norm_eps=_get(hf, "rms_norm_eps", 1e-6), tie_embeddings=_get(hf, "tie_word_embeddings", False),
                       dropout=_get(hf, "attention_dropout", 0.0), init_std=_get(hf, "initializer_range", 0.02))


def _llama_config_to_hf(c: LlamaConfig) -> dict:
    return {"vocab_size": c.vocab_size, "max_position_embeddings": c.block_size, "hidden_size": c.n_embd,
            "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "head_dim": c.n_embd // c.n_head, "hidden_act": "silu",
            "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": c.dropout, "initializer_range": c.init_std,
            # both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}


def _llama_params(c: LlamaConfig) -> list[Param]:
    kv = c.n_kv_head * (c.n_embd // c.n_head)
    out = [Param("wte.weight", ("model.embed_tokens.weight",))]
    for i in range(c.n_layer):
        h = f"model.layers.{i}"
        out += [Param(f"blocks.{i}.norm1.weight", (f"{h}.input_layernorm.weight",)),
                Param(f"blocks.{i}.attn.qkv.weight", tuple(f"{h}.self_attn.{p}_proj.weight" for p in "qkv"),
                      sizes=(c.n_embd, kv, kv)),
                Param(f"blocks.{i}.attn.proj.weight", (f"{h}.self_attn.o_proj.weight",)),
                Param(f"blocks.{i}.norm2.weight", (f"{h}.post_attention_layernorm.weight",)),
                Param(f"blocks.{i}.mlp.up.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
                      sizes=(c.mlp_hidden, c.mlp_hidden)),  # our SwiGLU Linear is [gate | up]
                Param(f"blocks.{i}.mlp.down.weight", (f"{h}.mlp.down_proj.weight",))]
    out.append(Param("norm_f.weight", ("model.norm.weight",)))
    if not c.tie_embeddings:
        out.append(Param("lm_head.weight", ("lm_head.weight",)))
    return out


# ---------------------------------------------------------------------------------------------
# BERT (BertForMaskedLM)

_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _bert_config_from_hf(hf: dict) -> BertConfig:
    act = _get(hf, "hidden_act", "gelu")
    if act not in _BERT_ACTIVATIONS:
        raise _unsupported(hf, "hidden_act", act)
    for key, ok in (("position_embedding_type", "absolute"), ("is_decoder", False), ("add_cross_attention", False),
                    ("tie_word_embeddings", True)):
        if _get(hf, key, ok) != ok:
            raise _unsupported(hf, key, hf[key])
    return BertConfig(vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "max_position_embeddings"),
                      n_layer=_get(hf, "num_hidden_layers"), n_head=_get(hf, "num_attention_heads"),
                      n_embd=_get(hf, "hidden_size"), mlp_hidden=_get(hf, "intermediate_size"),
                      type_vocab_size=_get(hf, "type_vocab_size", 2), activation=_BERT_ACTIVATIONS[act],
                      norm_eps=_get(hf, "layer_norm_eps", 1e-12), dropout=_get(hf, "hidden_dropout_prob", 0.1),
                      init_std=_get(hf, "initializer_range", 0.02), pad_id=_get(hf, "pad_token_id", 0))


def _bert_config_to_hf(c: BertConfig) -> dict:
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


def _bert_params(c: BertConfig) -> list[Param]:
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


def _bert_normalize(key: str) -> str:
    # the decoder weight is the (tied) word embedding: spelt as the tied output layer, which is dropped
    return "lm_head.weight" if key == "cls.predictions.decoder.weight" else key


# ---------------------------------------------------------------------------------------------
# BART (BartForConditionalGeneration)

def _bart_config_from_hf(hf: dict) -> BartConfig:
    act = _get(hf, "activation_function", "gelu")
    if act not in _BERT_ACTIVATIONS:
        raise _unsupported(hf, "activation_function", act)
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if _get(hf, a) != _get(hf, b):
            raise _unsupported(hf, b, hf[b])  # lmlab's BART has one width for both stacks
    if not _get(hf, "tie_word_embeddings", True):
        raise _unsupported(hf, "tie_word_embeddings", False)
    return BartConfig(vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "max_position_embeddings"),
                      n_layer=_get(hf, "encoder_layers"), n_dec_layer=_get(hf, "decoder_layers"),
                      n_head=_get(hf, "encoder_attention_heads"), n_embd=_get(hf, "d_model"),
                      mlp_hidden=_get(hf, "encoder_ffn_dim"), activation=_BERT_ACTIVATIONS[act],
                      dropout=_get(hf, "dropout", 0.1), scale_embedding=_get(hf, "scale_embedding", False),
                      init_std=_get(hf, "init_std", 0.02), pad_id=_get(hf, "pad_token_id", 1),
                      eos_id=_get(hf, "eos_token_id", 2), decoder_start_id=_get(hf, "decoder_start_token_id", 2))


def _bart_config_to_hf(c: BartConfig) -> dict:
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


def _bart_params(c: BartConfig) -> list[Param]:
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


ADAPTERS: dict[str, Adapter] = {
    "gpt": Adapter("gpt", "gpt2", "GPT2LMHeadModel", _gpt2_config_from_hf, _gpt2_config_to_hf, _gpt2_params,
                   ignore=re.compile(r"\.attn\.(bias|masked_bias)$"), normalize=_gpt2_normalize),
    "llama": Adapter("llama", "llama", "LlamaForCausalLM", _llama_config_from_hf, _llama_config_to_hf,
                     _llama_params, ignore=re.compile(r"rotary_emb\.inv_freq$")),
    # the decoder bias is `cls.predictions.bias` again; the pooler and next-sentence head are not an LM
    "bert": Adapter("bert", "bert", "BertForMaskedLM", _bert_config_from_hf, _bert_config_to_hf, _bert_params,
                    ignore=re.compile(r"cls\.predictions\.decoder\.bias$|embeddings\.(position|token_type)_ids$"
                                      r"|^bert\.pooler\.|^cls\.seq_relationship\."),
                    normalize=_bert_normalize),
    # the encoder's and decoder's token tables are `model.shared` again
    "bart": Adapter("bart", "bart", "BartForConditionalGeneration", _bart_config_from_hf, _bart_config_to_hf,
                    _bart_params, ignore=re.compile(r"^model\.(en|de)coder\.embed_tokens\.weight$")),
}


def _adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise LmlabError(f"no Hugging Face adapter for family '{family}' (have: {', '.join(ADAPTERS)})")
    return ADAPTERS[family]


def _adapter_for_hf(hf: dict) -> Adapter:
    mt = hf.get("model_type")
    for a in ADAPTERS.values():
        if a.model_type == mt:
            return a
    raise LmlabError(f"HF model_type '{mt}' is not supported (supported: "
                     f"{', '.join(a.model_type for a in ADAPTERS.values())})")


# ---------------------------------------------------------------------------------------------
# public API: configs and state dicts

def config_from_hf(hf_config: dict) -> ModelConfig:
    return _adapter_for_hf(hf_config).config_from_hf(hf_config)


def config_to_hf(cfg: ModelConfig) -> dict:
    a = _adapter(cfg.family)
    return {"model_type": a.model_type, "architectures": [a.architecture], **a.config_to_hf(cfg)}


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in build(cfg).state_dict().items()}


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF weights -> ours, checked against `cfg`: a missing, unexpected or misshapen weight is an
    LmlabError naming it. A tied output layer is taken from the token embedding."""
    a = _adapter(cfg.family)
    sd = {a.normalize(k): v for k, v in sd.items() if not a.ignore.search(k)}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # transformers ties it to the embedding on load
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for p in a.params(cfg):
        missing = [k for k in p.theirs if k not in sd]
        if missing:
            raise LmlabError(f"HF weights lack '{missing[0]}' (needed for {cfg.family} with this config)")
        parts = [sd.pop(k).t() if p.conv1d else sd.pop(k) for k in p.theirs]
        fits = all(x.ndim == parts[0].ndim and x.shape[1:] == parts[0].shape[1:] for x in parts)
        t = torch.cat(parts, dim=0) if fits else None
        if t is None or t.shape != shapes[p.ours]:
            got = " + ".join(str(tuple(x.shape)) for x in parts)
            raise LmlabError(f"HF weight {' + '.join(repr(k) for k in p.theirs)} has shape {got}; the config "
                             f"needs {tuple(shapes[p.ours])} for '{p.ours}'")
        out[p.ours] = t.contiguous()
    if sd:
        raise LmlabError(f"HF weight '{sorted(sd)[0]}' is not used by {cfg.family} with this config "
                         f"({len(sd)} unused)")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights -> HF's names and layouts (a tied output layer is left out, as transformers saves it)."""
    a = _adapter(cfg.family)
    out: dict[str, torch.Tensor] = {}
    for p in a.params(cfg):
        if p.ours not in sd:
            raise LmlabError(f"weights lack '{p.ours}'")
        t = sd[p.ours]
        parts = t.split(list(p.sizes), dim=0) if p.sizes else [t]
        for key, part in zip(p.theirs, parts, strict=True):
            out[key] = (part.t() if p.conv1d else part).detach().contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# models and directories

def from_hf(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """An lmlab model (eval mode, float32) from a transformers config dict and state dict."""
    cfg = config_from_hf(hf_config)
    model = build(cfg)
    model.load_state_dict(state_dict_from_hf(state_dict, cfg))
    return model.eval()


def to_hf(model: nn.Module, **extra: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) in transformers' format; `extra` adds config keys (e.g. eos_token_id)."""
    cfg = model.config
    return {**config_to_hf(cfg), **extra}, state_dict_to_hf(model.state_dict(), cfg)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        return sd
    other = "; it has only pickled weights, which lmlab does not load" if (path / "pytorch_model.bin").exists() else ""
    raise LmlabError(f"{path} has no model.safetensors{other}")


def load_hf_dir(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """(model in eval mode, tokenizer or None) from a Hugging Face model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LmlabError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    model = from_hf(hf, _read_safetensors(path))
    if dtype is not None:
        model.to(dtype)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return model, tokenizer


def save_hf_dir(model: nn.Module, path: str | Path, tokenizer: Tokenizer | None = None, *,
                overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) as a directory `transformers` loads (AutoModelForCausalLM; for BERT
    AutoModelForMaskedLM, for BART AutoModelForSeq2SeqLM)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LmlabError(f"{path} already exists (pass overwrite=True to replace it)")
    extra: dict[str, Any] = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if tokenizer is not None:
        for role in ("bos", "eos", "pad"):
            extra[f"{role}_token_id"] = tokenizer.token_to_id(getattr(tokenizer.specials, role))
    config, sd = to_hf(model, **extra)
    with atomic_dir(path, replace=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.cpu() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(str(tmp))
    return path
