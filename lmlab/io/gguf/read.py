"""GGUF import (llama.cpp's single-file format): Llama-architecture weights, config and tokenizer,
including the Mixtral layout (llama.cpp writes Mixtral as architecture "llama" with `{arch}.expert_count`).

Read with the `gguf` package (llama.cpp's own `gguf-py` reader); quantized tensors are dequantized
to float32 with `gguf.quants`. The format (ggml/docs/gguf.md) stores

- metadata as typed key/values: `general.architecture`, then `{arch}.block_count`,
  `{arch}.attention.head_count`, ... (converted here to a `LlamaConfig`), and `tokenizer.ggml.*`
  (converted to a tokenizer in lmlab/io/gguf/tokenizer.py);
- tensors under llama.cpp's names (`blk.N.attn_q.weight`, ...), each with its shape listed
  fastest-varying dimension first, so a [out, in] matrix appears as [in, out].

llama.cpp's converter reorders the rows of each head of `attn_q` / `attn_k` so that RoPE rotates
adjacent pairs (x0, x1), (x2, x3), ... (GPT-J style); our RoPE, like Hugging Face Llama's, rotates the
two halves of a head (x_i, x_{i + d/2}). `unpermute_qk` undoes that reordering.

The weights are mapped to Hugging Face names and go through the Llama adapter in lmlab/io/hf/llama.py, so
shape checks and the fused q/k/v and gate/up layouts live in one place. MoE layers store each projection
of all experts stacked, `blk.N.ffn_{gate,up,down}_exps` ([E, out, in] in PyTorch order), and the router
as `blk.N.ffn_gate_inp`; their names come from `gguf.constants` (`MODEL_TENSOR.FFN_*_EXP`), and they go
through the Mixtral adapter (lmlab/io/hf/mixtral.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io.hf import state_dict_from_hf
from lmlab.models.registry import build
from lmlab.models.transformer.llama import LlamaConfig
from lmlab.models.transformer.mixtral import MixtralConfig


def _gguf():
    try:
        import gguf
    except ImportError:  # optional dependency
        raise LmlabError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


# Tensor types we dequantize (ggml.h `ggml_type`); K-quants and i-quants are not supported yet.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor's raw `data` of type `qtype` (a `gguf.GGMLQuantizationType`) as float32 with
    `shape` given in PyTorch order (slowest dimension first)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype.name not in SUPPORTED_TYPES:
        raise LmlabError(f"GGUF tensor type {qtype.name} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    if qtype.name == "F32":
        arr = np.asarray(data).view(np.float32)
    else:
        arr = gguf.quants.dequantize(np.asarray(data), qtype)
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 views the read-only file


def read_metadata(reader: Any) -> dict[str, Any]:
    """The key/value metadata of an open `gguf.GGUFReader` as plain Python values."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # header fields (version, counts), not metadata
            continue
        out[key] = field.contents()
    return out


def open_gguf(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no GGUF file at {path}")
    try:
        return _gguf().GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise LmlabError(f"{path} is not a readable GGUF file: {e}") from None


# ---------------------------------------------------------------------------------------------
# metadata -> config

def _meta(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise LmlabError(f"GGUF metadata lacks '{key}'")
    return default


def config_from_gguf(meta: dict[str, Any], *, tie_embeddings: bool = True) -> LlamaConfig:
    """`LlamaConfig` (a `MixtralConfig` when it has experts) from GGUF metadata (key names from
    llama.cpp's gguf-py `constants.py` `Keys.LLM`)."""
    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise LmlabError(f"GGUF architecture '{arch}' is not supported (supported: llama)")
    n_embd, n_head = int(_meta(meta, "llama.embedding_length")), int(_meta(meta, "llama.attention.head_count"))
    head_dim = n_embd // n_head
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise LmlabError("GGUF: partial rotary embeddings (llama.rope.dimension_count != head size) are not supported")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or \
            float(meta.get("llama.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise LmlabError("GGUF: RoPE scaling is not supported")
    vocab = meta.get("llama.vocab_size") or len(_meta(meta, "tokenizer.ggml.tokens"))
    n_expert = int(meta.get("llama.expert_count", 0) or 0)  # gguf.constants Keys.LLM.EXPERT_COUNT
    moe = {}
    if n_expert:  # Mixtral: no z-loss in its training recipe
        moe = {"n_expert": n_expert, "n_expert_per_token": int(_meta(meta, "llama.expert_used_count")),
               "moe_z_loss_coef": 0.0, "moe_aux_pooled": True}
    return (MixtralConfig if n_expert else LlamaConfig)(
                       **moe, vocab_size=int(vocab), block_size=int(_meta(meta, "llama.context_length")),
                       n_layer=int(_meta(meta, "llama.block_count")), n_head=n_head,
                       n_kv_head=int(meta.get("llama.attention.head_count_kv", n_head)), n_embd=n_embd,
                       mlp_hidden=int(_meta(meta, "llama.feed_forward_length")),
                       rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
                       norm_eps=float(_meta(meta, "llama.attention.layer_norm_rms_epsilon")),
                       tie_embeddings=tie_embeddings)


# ---------------------------------------------------------------------------------------------
# weights

_LAYER_NAMES = {  # llama.cpp name (gguf-py tensor_mapping.py) -> Hugging Face LlamaForCausalLM name
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def moe_names() -> dict[str, str]:
    """llama.cpp's MoE tensor stems (from `gguf.constants`, "blk.{bid}." stripped) -> their role."""
    g = _gguf()
    T = g.MODEL_TENSOR
    return {g.TENSOR_NAMES[t].removeprefix("blk.{bid}."): role for t, role in
            ((T.FFN_GATE_INP, "router"), (T.FFN_GATE_EXP, "gate"), (T.FFN_UP_EXP, "up"), (T.FFN_DOWN_EXP, "down"))}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None for one we do not know."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, i, part = stem.split(".", 2)
        return f"model.layers.{i}.{_LAYER_NAMES[part]}.{suffix}" if part in _LAYER_NAMES else None
    return f"{_TOP_NAMES[stem]}.{suffix}" if stem in _TOP_NAMES else None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp convert_hf_to_gguf.py's `permute`: within each head it interleaved the rows of
    the two RoPE halves; put them back as [first half | second half]."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does (for export): half-split rows -> interleaved pairs, per head."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def state_dict_from_gguf(reader: Any, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our Llama weights (float32) from the tensors of an open `gguf.GGUFReader`."""
    hf: dict[str, torch.Tensor] = {}
    moe, experts = moe_names(), {}
    for t in reader.tensors:
        key = hf_name(t.name)
        stem = t.name.removesuffix(".weight")
        role = moe.get(stem.split(".", 2)[-1]) if stem.startswith("blk.") else None
        if role is not None:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            experts[int(stem.split(".")[1]), role] = dequantize(t.data, t.tensor_type, shape)
            continue
        if key is None:
            if t.name == "rope_freqs.weight" or t.name.endswith(".rope_freqs.weight"):
                raise LmlabError("GGUF: Llama-3 style rope frequency factors are not supported")
            raise LmlabError(f"GGUF tensor '{t.name}' is not a Llama weight lmlab knows")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type, shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.n_kv_head)
        hf[key] = w
    for (i, role), w in experts.items():  # to transformers' stacked layout: router, [gate | up], down
        h = f"model.layers.{i}.mlp"
        if role == "router":
            hf[f"{h}.gate.weight"] = w
        elif role == "down":
            hf[f"{h}.experts.down_proj"] = w
        elif role == "gate":
            hf[f"{h}.experts.gate_up_proj"] = torch.cat([w, experts[i, "up"]], dim=1)
    return state_dict_from_hf(hf, cfg)


def gguf_model_config(reader: Any, meta: dict[str, Any]) -> LlamaConfig:
    """The model config of an open GGUF file: its metadata, and a tied output layer unless it stores one."""
    return config_from_gguf(meta, tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))


def load_gguf(path: str | Path) -> tuple[nn.Module, Any]:
    """(float32 Llama in eval mode, its tokenizer) from a GGUF file."""
    from lmlab.io.gguf.tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    meta = read_metadata(reader)
    cfg = gguf_model_config(reader, meta)
    with torch.device("meta"):
        model = build(cfg)
    model.load_state_dict(state_dict_from_gguf(reader, cfg), assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model.eval(), tokenizer_from_gguf(meta)
