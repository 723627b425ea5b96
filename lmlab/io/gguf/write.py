"""GGUF export of an lmlab Llama, Qwen2 (Llama with q/k/v biases) or Mixtral (and its byte-level BPE
tokenizer), the inverse of lmlab/io/gguf/read.py. Mixtral goes out as llama.cpp's converter writes it:
architecture "llama" with `expert_count` / `expert_used_count` and stacked `ffn_{gate,up,down}_exps`
tensors plus `ffn_gate_inp`; a model with q/k/v biases as architecture "qwen2".

Weights go out under llama.cpp's names, for "llama" with q/k rows permuted for its pairwise RoPE (what
convert_hf_to_gguf.py does), matrices in the chosen type and norms in F32 (as llama.cpp keeps them).
Llama 3.1's RoPE scaling goes out as llama.cpp's converter writes it, the tensor `rope_freqs.weight`
(one divisor per frequency); linear scaling as `rope.scaling.type` / `rope.scaling.factor`.
Block-quantized types need rows that are a multiple of the block size (32 values); a matrix whose
rows are not falls back to F16.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io.gguf.read import (
    _LAYER_NAMES,
    _TOP_NAMES,
    ARCHS,
    ROPE_FREQS,
    SUPPORTED_TYPES,
    _gguf,
    moe_names,
    permute_qk,
)
from lmlab.io.gguf.tokenizer import CONTROL, LLAMA3_SPLIT
from lmlab.io.hf import state_dict_to_hf
from lmlab.nn.position import RotaryEmbedding

_TO_GGUF = {v: k for k, v in {**_LAYER_NAMES, **_TOP_NAMES}.items()}
NORMAL = 1  # llama.cpp llama_token_type


def gguf_name(hf: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, part = stem.split(".", 3)
        return f"blk.{i}.{_TO_GGUF[part]}.{suffix}"
    return f"{_TO_GGUF[stem]}.{suffix}"


def _gguf_tensors(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named weights -> llama.cpp names; a MoE layer's stacked experts split into gate/up/down."""
    stems = {role: stem for stem, role in moe_names().items()}
    out = {}
    for key, t in hf.items():
        if ".mlp.gate." in key or ".mlp.experts." in key:
            i = key.split(".")[2]
            if key.endswith("gate.weight"):
                out[f"blk.{i}.{stems['router']}.weight"] = t
            elif key.endswith("gate_up_proj"):
                gate, up = t.chunk(2, dim=1)
                out[f"blk.{i}.{stems['gate']}.weight"], out[f"blk.{i}.{stems['up']}.weight"] = gate, up
            else:
                out[f"blk.{i}.{stems['down']}.weight"] = t
        else:
            out[gguf_name(key)] = t
    return out


def _pre_name(data: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how a tokenizer.json splits text before BPE: the splits
    lmlab/io/gguf/tokenizer.py knows by name, else GPT-2's regex (what lmlab's own BPE trains with)."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"  # every digit its own piece, then GPT-2's split (SmolLM2, StarCoder)
    if any(p.get("type") == "Split" and p.get("pattern", {}).get("Regex") == LLAMA3_SPLIT for p in parts):
        return "llama-bpe"
    return "gpt-2"


def _add_tokenizer(w, tokenizer) -> None:
    data = json.loads(tokenizer.hf.to_str())
    if data["model"]["type"] != "BPE":
        raise LmlabError("GGUF export supports byte-level BPE tokenizers only")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    # how text is split before BPE: as the file it came from said, else as its tokenizer.json splits
    w.add_tokenizer_pre(getattr(tokenizer, "gguf_pre", None) or _pre_name(data))
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    w.add_token_merges(merges)
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                      ("unk", w.add_unk_token_id)):
        i = tokenizer.token_to_id(getattr(tokenizer.specials, role))
        if i is not None:
            add(i)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def _rope_tensors_and_keys(c) -> dict:
    """RoPE scaling as llama.cpp stores it: {GGUFWriter method: value} plus {ROPE_FREQS: factors}."""
    s = dict(c.rope_scaling or {})
    kind = s.get("rope_type", "default")
    if kind == "default":
        return {}
    if kind == "linear":
        return {"add_rope_scaling_type": _gguf().RopeScalingType.LINEAR, "add_rope_scaling_factor": float(s["factor"])}
    if kind == "freq_factors":  # read from a GGUF file: as it was
        return {ROPE_FREQS: np.asarray(s["factors"], dtype=np.float32)}
    if kind == "llama3":  # convert_hf_to_gguf.py LlamaModel: base / scaled inverse frequencies
        d = c.n_embd // c.n_head
        plain = RotaryEmbedding(d, c.rope_theta).inv_freq(0)
        scaled = RotaryEmbedding(d, c.rope_theta, s, max_position=c.block_size).inv_freq(0)
        return {ROPE_FREQS: (plain / scaled).numpy().astype(np.float32)}
    raise LmlabError(f"GGUF export: RoPE scaling '{kind}' has no GGUF form here (supported: linear, llama3)")


def save_gguf(model: nn.Module, path: str | Path, tokenizer=None, *, qtype: str = "F16",
              overwrite: bool = False) -> Path:
    """Write a Llama `model` (and `tokenizer`) as one GGUF file that llama.cpp and transformers load."""
    gguf = _gguf()
    c = model.config
    if c.family not in ("llama", "mixtral"):
        raise LmlabError(f"GGUF export supports the llama and mixtral families, not '{c.family}'")
    if qtype not in SUPPORTED_TYPES:
        raise LmlabError(f"GGUF type '{qtype}' is not supported for export (supported: {', '.join(SUPPORTED_TYPES)})")
    path = Path(path)
    if path.exists() and not overwrite:
        raise LmlabError(f"{path} already exists (pass overwrite=True to replace it)")
    if c.sliding_window or c.global_tokens or c.global_every or c.global_stride or not c.global_rope:
        # llama.cpp's llama/qwen2 graphs attend to every earlier position: written as is, the file would
        # load and silently compute another model
        raise LmlabError("GGUF export: sliding-window attention and global tokens have no form in the llama "
                         "architecture (llama.cpp would attend to every position); export to an HF directory")
    arch = "qwen2" if getattr(c, "qkv_bias", False) else "llama"
    if arch == "qwen2" and c.n_expert:
        raise LmlabError("GGUF export: a MoE model with q/k/v biases has no llama.cpp architecture")
    extra = _rope_tensors_and_keys(c)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.mlp_hidden)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.norm_eps))
    w.add_rope_dimension_count(c.n_embd // c.n_head)
    w.add_vocab_size(c.vocab_size)
    if c.n_expert:
        w.add_expert_count(c.n_expert)
        w.add_expert_used_count(c.n_expert_per_token)
    for key, value in extra.items():
        if key == ROPE_FREQS:
            w.add_tensor(ROPE_FREQS, value)
        else:
            getattr(w, key)(value)
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer)
    q = gguf.GGMLQuantizationType[qtype]
    for name, t in _gguf_tensors(state_dict_to_hf(model.state_dict(), c)).items():
        x = t.detach().to(torch.float32).cpu().numpy()
        if ARCHS[arch].permute_qk and ".attn_q." in name:
            x = permute_qk(x, c.n_head)
        elif ARCHS[arch].permute_qk and ".attn_k." in name:
            x = permute_qk(x, c.n_kv_head)
        if x.ndim == 1:
            w.add_tensor(name, x)
        else:
            block = gguf.GGML_QUANT_SIZES[q][0]
            kind = q if x.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
