"""Hugging Face adapter: Llama (LlamaForCausalLM), and Mistral and Qwen2 as Llama with a sliding window or
with biases on q/k/v (`qkv_bias`)."""

from __future__ import annotations

import re

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import Adapter, Param, get, register, unsupported
from lmlab.models.transformer.llama import LlamaConfig
from lmlab.nn.position import ROPE_TYPES


def config_from_hf(hf: dict) -> LlamaConfig:
    n_embd, n_head = get(hf, "hidden_size"), get(hf, "num_attention_heads")
    if get(hf, "hidden_act", "silu") != "silu":
        raise unsupported(hf, "hidden_act", hf["hidden_act"])
    for key in ("attention_bias", "mlp_bias"):
        if get(hf, key, False):
            raise unsupported(hf, key, hf[key])
    if get(hf, "head_dim", n_embd // n_head) * n_head != n_embd:
        raise unsupported(hf, "head_dim", hf["head_dim"])
    rope, scaling = rope_settings(hf)
    # Mistral is Llama with a sliding window (key j visible to query i when i - j < sliding_window)
    window = get(hf, "sliding_window", None) if hf.get("model_type") == "mistral" else None
    # Qwen2: q/k/v biases; its sliding window applies only with use_sliding_window (off in released models)
    qwen2 = hf.get("model_type") == "qwen2"
    if qwen2 and get(hf, "use_sliding_window", False):
        raise unsupported(hf, "use_sliding_window", True)
    block_size = get(hf, "max_position_embeddings")
    if scaling and scaling["rope_type"] == "dynamic":
        # dynamic NTK stretches past max_position_embeddings: our context is the stretched one
        block_size = int(block_size * scaling["factor"])
    return LlamaConfig(vocab_size=get(hf, "vocab_size"), block_size=block_size,
                       n_layer=get(hf, "num_hidden_layers"), n_head=n_head,
                       n_kv_head=get(hf, "num_key_value_heads", n_head), n_embd=n_embd,
                       mlp_hidden=get(hf, "intermediate_size"),
                       rope_theta=float(rope.get("rope_theta") or get(hf, "rope_theta", 10000.0)),
                       rope_scaling=scaling, sliding_window=window or 0, qkv_bias=qwen2,
                       norm_eps=get(hf, "rms_norm_eps", 1e-6), tie_embeddings=get(hf, "tie_word_embeddings", False),
                       dropout=get(hf, "attention_dropout", 0.0), init_std=get(hf, "initializer_range", 0.02))


def config_to_hf(c: LlamaConfig) -> dict:
    if c.global_tokens or c.global_every or c.global_stride or not c.global_rope:
        raise LmlabError("global tokens and local/global layer patterns have no transformers Llama/Mistral "
                         "equivalent")
    window = {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
              "sliding_window": c.sliding_window} if c.sliding_window else {}
    if c.qkv_bias:
        if c.sliding_window:
            raise LmlabError("transformers has no Llama with both q/k/v biases and a sliding window")
        window = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                  "sliding_window": None}
    scaling = dict(c.rope_scaling or {})
    max_pos = scaling.pop("original_max_position_embeddings") if scaling.get("rope_type") == "dynamic" else c.block_size
    return {"vocab_size": c.vocab_size, "max_position_embeddings": max_pos, "hidden_size": c.n_embd,
            "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "head_dim": c.n_embd // c.n_head, "hidden_act": "silu",
            "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": c.dropout, "initializer_range": c.init_std,
            # both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta and rope_scaling
            "rope_theta": c.rope_theta, "rope_scaling": scaling or None,
            "rope_parameters": {"rope_type": "default", **scaling, "rope_theta": c.rope_theta}, **window}


def rope_settings(hf: dict) -> tuple[dict, dict | None]:
    """(the config's RoPE dict, lmlab's `rope_scaling` or None). transformers >= 5 keeps the settings in
    "rope_parameters", 4.x in "rope_scaling" (where the type was once spelt "type") and a top-level
    rope_theta."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.pop("type", None) or rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise unsupported(hf, "rope_type", kind)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported(hf, "partial_rotary_factor", rope["partial_rotary_factor"])
    if kind == "default":
        return rope, None
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} | {"rope_type": kind}
    if kind in ("yarn", "llama3", "dynamic"):  # transformers falls back to max_position_embeddings
        scaling.setdefault("original_max_position_embeddings", get(hf, "max_position_embeddings"))
    return rope, scaling


def params(c: LlamaConfig) -> list[Param]:
    kv = c.n_kv_head * (c.n_embd // c.n_head)
    out = [Param("wte.weight", ("model.embed_tokens.weight",))]
    for i in range(c.n_layer):
        h = f"model.layers.{i}"
        out += [Param(f"blocks.{i}.norm1.weight", (f"{h}.input_layernorm.weight",)),
                Param(f"blocks.{i}.attn.qkv.weight", tuple(f"{h}.self_attn.{p}_proj.weight" for p in "qkv"),
                      sizes=(c.n_embd, kv, kv)),
                *([Param(f"blocks.{i}.attn.qkv.bias", tuple(f"{h}.self_attn.{p}_proj.bias" for p in "qkv"),
                         sizes=(c.n_embd, kv, kv))] if c.qkv_bias else []),
                Param(f"blocks.{i}.attn.proj.weight", (f"{h}.self_attn.o_proj.weight",)),
                Param(f"blocks.{i}.norm2.weight", (f"{h}.post_attention_layernorm.weight",)),
                Param(f"blocks.{i}.mlp.up.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
                      sizes=(c.mlp_hidden, c.mlp_hidden)),  # our SwiGLU Linear is [gate | up]
                Param(f"blocks.{i}.mlp.down.weight", (f"{h}.mlp.down_proj.weight",))]
    out.append(Param("norm_f.weight", ("model.norm.weight",)))
    if not c.tie_embeddings:
        out.append(Param("lm_head.weight", ("lm_head.weight",)))
    return out


ADAPTER = register(Adapter(
    "llama", "llama", "LlamaForCausalLM", config_from_hf, config_to_hf, params,
    ignore=re.compile(r"rotary_emb\.inv_freq$"),
    also_reads=("mistral", "qwen2")))
