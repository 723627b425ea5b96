"""GGUF import (llama.cpp's single-file format): Llama, Llama-3 (RoPE frequency factors), Qwen2 and the
Mixtral layout (llama.cpp writes Mixtral as architecture "llama" with `{arch}.expert_count`).

The format (ggml/docs/gguf.md) stores, read by `GGUFFile` (a lean parser; gguf-py's reader kept ~150 MB
of numpy views for SmolLM2's vocabulary)
- metadata as typed key/values: `general.architecture`, then `{arch}.block_count`,
  `{arch}.attention.head_count`, ... (converted here to a `LlamaConfig`), and `tokenizer.ggml.*`
  (converted to a tokenizer in lmlab/io/gguf/tokenizer.py);
- tensors under llama.cpp's names (`blk.N.attn_q.weight`, ...), each with its shape listed
  fastest-varying dimension first, so a [out, in] matrix appears as [in, out].

Each architecture is one `ArchSpec` in `ARCHS`: its llama.cpp tensor names -> Hugging Face names (so
shapes and the fused q/k/v and gate/up layouts come from the HF adapter's parameter list,
lmlab/io/hf/llama.py, in one place) and whether llama.cpp's converter reordered the q/k rows. For
`llama` it did: within each head the rows were interleaved so that RoPE rotates adjacent pairs (GPT-J
style, LLAMA_ROPE_TYPE_NORM); our RoPE, like Hugging Face's, rotates the two halves of a head, and
`unpermute_qk` undoes it. Qwen2 uses the half-split (NEOX) rotation and is stored as is, with biases on
q/k/v. Llama 3.1's RoPE scaling arrives as the tensor `rope_freqs.weight` (one divisor per frequency).
MoE layers store each projection of all experts stacked, `blk.N.ffn_{gate,up,down}_exps` ([E, out,
in] in PyTorch order) and the router `blk.N.ffn_gate_inp` (names from `gguf.constants`); they go
through the Mixtral adapter (lmlab/io/hf/mixtral.py) in float32.

`load_gguf(path, blocks=True)` puts block-quantized matrices (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K)
straight into lmlab's quantized layers (lmlab/nn/quant.py), unpacked one tensor at a time from the
memory-mapped file, so no float32 copy of the model is ever made; everything else (norms, F32/F16
matrices, MoE experts, IQ-quants) is dequantized to float32 with `gguf.quants`. `blocks=False` gives a
float32 model. The file's pages are handed back to the OS after each tensor: they would otherwise stay
in the process's resident memory next to the unpacked copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import ADAPTERS
from lmlab.models.registry import build
from lmlab.models.transformer.llama import LlamaConfig
from lmlab.models.transformer.mixtral import MixtralConfig
from lmlab.nn import quant_kernels
from lmlab.nn.quant import KERNEL_ROWS, BlockEmbedding, linear_from_blocks, pack_block_args
from lmlab.nn.quant_formats import BLOCKS, unpack


def _gguf():
    try:
        import gguf
    except ImportError:  # optional dependency
        raise LmlabError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


# Tensor types lmlab writes (lmlab/io/gguf/write.py). Reading takes any type `gguf.quants` dequantizes
# (K-quants and IQ-quants included); those in quant_formats.BLOCKS can stay in their blocks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor's raw `data` of type `qtype` (a `gguf.GGMLQuantizationType`) as float32 with
    `shape` given in PyTorch order (slowest dimension first)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype.name == "F32":
        arr = np.asarray(data).view(np.float32)
    else:
        try:
            arr = gguf.quants.dequantize(np.asarray(data), qtype)
        except NotImplementedError:
            raise LmlabError(f"GGUF tensor type {qtype.name} is not supported (gguf.quants cannot dequantize "
                             "it)") from None
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 views the read-only file


def read_metadata(reader: Any) -> dict[str, Any]:
    """The key/value metadata of an open GGUF file (`open_gguf`) as plain Python values."""
    return dict(reader.metadata)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: `shape` fastest-varying dimension first (as the file and gguf-py list
    it), `data` a read-only view of its bytes in the memory-mapped file, one row per slowest index."""
    name: str
    tensor_type: Any   # gguf.GGMLQuantizationType
    shape: np.ndarray
    data: np.ndarray


class GGUFFile:
    """A GGUF file (ggml/docs/gguf.md, version 2 or 3, little-endian) parsed into plain values: `metadata`
    {key: value} and `tensors` over one read-only memory map. gguf-py's `GGUFReader` keeps a numpy view
    for every part of every metadata item (~150 MB for a 49k-token vocabulary); this keeps the values."""

    _SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                11: "<i8", 12: "<f8"}  # gguf_type codes -> numpy dtypes (7: bool, 8: string, 9: array)

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.data = np.memmap(path, mode="r")
        self.pos = 0
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        self.pos = 4
        version, n_tensors, n_kv = self._read("<u4"), self._read("<u8"), self._read("<u8")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (lmlab reads 2 and 3)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<u4"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<u8") for _ in range(self._read("<u4"))]
            infos.append((name, dims, self._read("<u4"), self._read("<u8")))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, offset in infos:
            qtype = gguf.GGMLQuantizationType(kind)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * size
            begin = start + offset
            raw = self.data[begin:begin + rows * row_bytes]
            if len(raw) != rows * row_bytes:
                raise ValueError(f"tensor '{name}' runs past the end of the file")
            if qtype.name in ("F32", "F16"):
                raw = raw.view(np.float32 if qtype.name == "F32" else np.float16)
            self.tensors.append(GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), raw.reshape(rows, -1)))

    def _read(self, dtype: str) -> Any:
        size = np.dtype(dtype).itemsize
        v = self.data[self.pos:self.pos + size].view(dtype)[0]
        self.pos += size
        return v.item()

    def _string(self) -> str:
        n = self._read("<u8")
        s = bytes(self.data[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, kind: int) -> Any:
        if kind == 8:
            return self._string()
        if kind == 9:
            inner, n = self._read("<u4"), self._read("<u8")
            if inner in self._SCALARS:  # numbers: one vectorised read
                dt = np.dtype(self._SCALARS[inner])
                arr = self.data[self.pos:self.pos + n * dt.itemsize].view(dt)
                self.pos += n * dt.itemsize
                return [bool(x) for x in arr] if inner == 7 else arr.tolist()
            return [self._value(inner) for _ in range(n)]
        if kind not in self._SCALARS:
            raise ValueError(f"unknown metadata type {kind}")
        v = self._read(self._SCALARS[kind])
        return bool(v) if kind == 7 else v


def open_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no GGUF file at {path}")
    try:
        return GGUFFile(path)  # memory-maps the file (read-only)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise LmlabError(f"{path} is not a readable GGUF file: {e}") from None


def _release(reader: Any) -> None:
    """Drop the file's pages from this process's resident set (they are clean, re-read on demand)."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere nothing): the tensors'
    unpacking frees tens of MB of temporaries that glibc would keep resident (26 MB on SmolLM2)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024


def _pin_mmap_threshold() -> bool:
    """Serve allocations of 256 KiB and more with their own mappings, returned to the OS when freed (glibc's
    `mallopt`; elsewhere nothing). glibc's default threshold (128 KiB) rises to the size of each large block
    freed, after which a prefill's per-layer temporaries (dequantized weights, activations) come from the
    heap and stay resident; pinned, SmolLM2 Q4_1's peak model memory drops by ~12 MB and the RSS after a
    prefill by ~35 MB (benchmarks/results/llm_inference.md). Only for block-quantized loads, the inference
    path: training allocates large tensors every step and would pay a page fault per fresh page. glibc's
    own setting wins: with MALLOC_MMAP_THRESHOLD_ in the environment nothing is changed. True if pinned."""
    return "MALLOC_MMAP_THRESHOLD_" not in os.environ and _mallopt_mmap_threshold(MMAP_THRESHOLD)


def _mallopt_mmap_threshold(size: int) -> bool:
    """glibc's `mallopt(M_MMAP_THRESHOLD, size)`; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


HEAP_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)


def _heap_for_many_tokens(model: nn.Module) -> None:
    """Around a forward over many tokens (generation's prefill; scoring: `lmlab eval`, `fewshot`), take the
    temporaries from the heap, then pin the threshold again and hand the freed pages back (`malloc_trim`).
    Each fresh mapping is zero-filled page by page on first touch: a 256-token prefill of SmolLM2 makes
    ~300 MB of temporaries (~75,000 page faults), which the heap serves from the same pages layer after
    layer (prefill 1.4x faster at 2 threads; scoring 1.3x). Its reuse costs a few MB at the peak now that
    the kernels' arguments are packed at load (`pack_block_args`) and the MLP's gate, silu and product are
    fused (`quant._swiglu`): SmolLM2 Q4_1's model memory stays ~1.1x llama.cpp's (docs/gguf/README.md)."""
    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.numel() > KERNEL_ROWS:
            module._many_tokens_heap = _mallopt_mmap_threshold(HEAP_MMAP_THRESHOLD)

    def after(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        if module.__dict__.pop("_many_tokens_heap", False):  # also after an exception (always_call)
            _mallopt_mmap_threshold(MMAP_THRESHOLD)
            _trim_heap()

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True, always_call=True)


# ---------------------------------------------------------------------------------------------
# architectures

_LAYER_NAMES = {  # llama.cpp name (gguf-py tensor_mapping.py) -> Hugging Face LlamaForCausalLM name
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # gguf.constants MODEL_TENSOR.ROPE_FREQS: Llama 3.1's per-frequency divisors


@dataclass(frozen=True)
class ArchSpec:
    """How one `general.architecture` maps onto lmlab's Llama (llama.cpp src/llama-arch.cpp)."""
    permute_qk: bool                 # q/k rows interleaved per head for pairwise RoPE (undone on import)
    qkv_bias: bool = False           # biases on q/k/v (Qwen2)
    layer_names: dict[str, str] = field(default_factory=lambda: dict(_LAYER_NAMES))
    top_names: dict[str, str] = field(default_factory=lambda: dict(_TOP_NAMES))


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(permute_qk=True),
    "qwen2": ArchSpec(permute_qk=False, qkv_bias=True),  # LLM_ARCH_QWEN2: LLAMA_ROPE_TYPE_NEOX, as HF
}


def arch_spec(meta: dict[str, Any]) -> tuple[str, ArchSpec]:
    arch = _meta(meta, "general.architecture")
    if arch not in ARCHS:
        raise LmlabError(f"GGUF architecture '{arch}' is not supported (supported: {', '.join(ARCHS)})")
    return arch, ARCHS[arch]


# ---------------------------------------------------------------------------------------------
# metadata -> config

def _meta(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise LmlabError(f"GGUF metadata lacks '{key}'")
    return default


def _rope_scaling(meta: dict[str, Any], arch: str, factors: torch.Tensor | None, head_dim: int) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if factors is not None:
        if kind not in ("none", "linear") or factor != 1.0 or factors.numel() != head_dim // 2:
            raise LmlabError(f"GGUF: {ROPE_FREQS} with {factors.numel()} factors (head size {head_dim}) and "
                             f"RoPE scaling '{kind}' x{factor} is not supported")
        return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}
    if kind == "linear" and factor != 1.0:
        return {"rope_type": "linear", "factor": factor}
    if kind not in ("none", "linear"):
        raise LmlabError(f"GGUF: RoPE scaling '{kind}' is not supported (supported: linear, {ROPE_FREQS})")
    return None


def config_from_gguf(meta: dict[str, Any], *, tie_embeddings: bool = True,
                     rope_factors: torch.Tensor | None = None) -> LlamaConfig:
    """`LlamaConfig` (a `MixtralConfig` when it has experts) from GGUF metadata (key names from
    llama.cpp's gguf-py `constants.py` `Keys.LLM`); `rope_factors`: the file's `rope_freqs.weight`."""
    arch, spec = arch_spec(meta)

    def key(name: str, default: Any = None) -> Any:
        return _meta(meta, f"{arch}.{name}", default)

    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = n_embd // n_head
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise LmlabError(f"GGUF: partial rotary embeddings ({arch}.rope.dimension_count != head size) are not "
                         "supported")
    if int(key("attention.key_length", head_dim)) != head_dim:
        raise LmlabError(f"GGUF: a head size other than embedding_length / head_count ({arch}.attention."
                         "key_length) is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(_meta(meta, "tokenizer.ggml.tokens"))
    n_expert = int(key("expert_count", 0) or 0)  # gguf.constants Keys.LLM.EXPERT_COUNT
    moe = {}
    if n_expert:  # Mixtral: no z-loss in its training recipe
        moe = {"n_expert": n_expert, "n_expert_per_token": int(key("expert_used_count")),
               "moe_z_loss_coef": 0.0, "moe_aux_pooled": True}
    return (MixtralConfig if n_expert else LlamaConfig)(
        **moe, vocab_size=int(vocab), block_size=int(key("context_length")), n_layer=int(key("block_count")),
        n_head=n_head, n_kv_head=int(key("attention.head_count_kv", n_head)), n_embd=n_embd,
        mlp_hidden=int(key("feed_forward_length")), rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, rope_factors, head_dim),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")), qkv_bias=spec.qkv_bias,
        tie_embeddings=tie_embeddings)


# ---------------------------------------------------------------------------------------------
# weights

def moe_names() -> dict[str, str]:
    """llama.cpp's MoE tensor stems (from `gguf.constants`, "blk.{bid}." stripped) -> their role."""
    g = _gguf()
    T = g.MODEL_TENSOR
    return {g.TENSOR_NAMES[t].removeprefix("blk.{bid}."): role for t, role in
            ((T.FFN_GATE_INP, "router"), (T.FFN_GATE_EXP, "gate"), (T.FFN_UP_EXP, "up"), (T.FFN_DOWN_EXP, "down"))}


def hf_name(name: str, spec: ArchSpec = ARCHS["llama"]) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None for one we do not know."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, i, part = stem.split(".", 2)
        return f"model.layers.{i}.{spec.layer_names[part]}.{suffix}" if part in spec.layer_names else None
    return f"{spec.top_names[stem]}.{suffix}" if stem in spec.top_names else None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp convert_hf_to_gguf.py's `permute`: within each head it interleaved the rows of
    the two RoPE halves; put them back as [first half | second half]."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does (for export): half-split rows -> interleaved pairs, per head."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Source:
    """One GGUF tensor, not yet read: its rows to un-permute for `heads` heads (0: none)."""
    tensor: Any
    heads: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensor.shape.tolist()))

    @property
    def qtype(self) -> str:
        return _gguf().GGMLQuantizationType(self.tensor.tensor_type).name

    def rows(self) -> torch.Tensor | None:
        return unpermute_qk(torch.arange(self.shape[0]), self.heads) if self.heads else None

    def float(self) -> torch.Tensor:
        w = dequantize(self.tensor.data, self.tensor.tensor_type, self.shape)
        return unpermute_qk(w, self.heads) if self.heads else w

    def blocks(self):
        n, k = self.shape
        u = unpack(self.tensor.data, self.qtype, n, k)
        rows = self.rows()
        if rows is not None:
            u.codes, u.d = u.codes[rows.numpy()], u.d[rows.numpy()]
            u.m = None if u.m is None else u.m[rows.numpy()]
        return u


def _sources(reader: Any, spec: ArchSpec, cfg: LlamaConfig) -> dict[str, _Source | torch.Tensor]:
    """HF name -> the GGUF tensor it comes from (MoE experts: already float32 in transformers' layout)."""
    out: dict[str, _Source | torch.Tensor] = {}
    moe, experts = moe_names(), {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # read into the config
            continue
        stem = t.name.removesuffix(".weight")
        role = moe.get(stem.split(".", 2)[-1]) if stem.startswith("blk.") else None
        if role is not None:
            experts[int(stem.split(".")[1]), role] = _Source(t).float()
            continue
        key = hf_name(t.name, spec)
        if key is None:
            raise LmlabError(f"GGUF tensor '{t.name}' is not a weight lmlab knows for this architecture")
        heads = 0
        if spec.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = cfg.n_head if ".attn_q." in t.name else cfg.n_kv_head
        out[key] = _Source(t, heads)
    for (i, role), w in experts.items():  # to transformers' stacked layout: router, [gate | up], down
        h = f"model.layers.{i}.mlp"
        if role == "router":
            out[f"{h}.gate.weight"] = w
        elif role == "down":
            out[f"{h}.experts.down_proj"] = w
        elif role == "gate":
            out[f"{h}.experts.gate_up_proj"] = torch.cat([w, experts[i, "up"]], dim=1)
    return out


def gguf_model_config(reader: Any, meta: dict[str, Any]) -> LlamaConfig:
    """The model config of an open GGUF file: its metadata, RoPE frequency factors if stored, and a tied
    output layer unless it stores one."""
    tensors = {t.name: t for t in reader.tensors}
    factors = tensors.get(ROPE_FREQS)
    if factors is not None:
        factors = dequantize(factors.data, factors.tensor_type, (int(factors.shape.prod()),))
    return config_from_gguf(meta, tie_embeddings="output.weight" not in tensors, rope_factors=factors)


@contextlib.contextmanager
def _skeleton() -> Iterator[None]:
    """Build modules on the meta device with torch.nn.init's initialisers as no-ops (their values are
    replaced by the file's). On meta tensors `normal_` goes through torch._refs, whose first use imports
    torch._dynamo and sympy: ~70 MB resident on SmolLM2, that a loaded model would otherwise carry."""
    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}
    try:
        for n in saved:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def _in_blocks(parts: list, blocks: bool) -> bool:
    return blocks and quant_kernels.available() and all(
        isinstance(p, _Source) and len(p.shape) == 2 and p.qtype in BLOCKS for p in parts)


def _load_weights(reader: Any, cfg: LlamaConfig, spec: ArchSpec, blocks: bool,
                  prefill_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """(float32 state dict, {module name: quantized layer}) for `cfg`'s model, in one pass over the
    adapter's parameters: each fused parameter's GGUF parts are read, converted and released together."""
    src = _sources(reader, spec, cfg)
    if cfg.tie_embeddings:
        src.pop("lm_head.weight", None)
    with _skeleton():
        shapes = {k: v.shape for k, v in build(cfg).state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    layers: dict[str, nn.Module] = {}
    for p in ADAPTERS[cfg.family].params(cfg):
        missing = [k for k in p.theirs if k not in src]
        if missing:
            raise LmlabError(f"GGUF file lacks the tensor for '{missing[0]}' (needed for {cfg.family} with this "
                             "config)")
        parts = [src.pop(k) for k in p.theirs]
        got = [tuple(x.shape) for x in parts]
        want = tuple(shapes[p.ours])
        if sum(g[0] for g in got) != want[0] or any(g[1:] != want[1:] for g in got):
            raise LmlabError(f"GGUF tensors for '{p.ours}' have shapes {got}; the config needs {want}")
        module, _, kind = p.ours.rpartition(".")
        if kind == "weight" and _in_blocks(parts, blocks) and (module == "wte" or len(want) == 2):
            layers[module] = linear_from_blocks([x.blocks() for x in parts], prefill_dtype=prefill_dtype)
        else:
            sd[p.ours] = torch.cat([x.float() if isinstance(x, _Source) else x for x in parts]).contiguous()
        _release(reader)
    if src:
        raise LmlabError(f"GGUF tensor for '{sorted(src)[0]}' is not used by {cfg.family} with this config "
                         f"({len(src)} unused)")
    return sd, layers


def state_dict_from_gguf(reader: Any, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our weights (float32) from the tensors of an open `gguf.GGUFReader`."""
    _, spec = arch_spec(read_metadata(reader))
    sd, _ = _load_weights(reader, cfg, spec, blocks=False, prefill_dtype=torch.float32)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    return sd


def load_gguf(path: str | Path, *, blocks: bool = False,
              prefill_dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model in eval mode, its tokenizer) from a GGUF file. `blocks`: block-quantized matrices stay in
    their blocks (lmlab/nn/quant.py's exact kernels; many-row calls in `prefill_dtype`), else float32."""
    from lmlab.io.gguf.tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    meta = read_metadata(reader)
    _, spec = arch_spec(meta)
    cfg = gguf_model_config(reader, meta)
    with _skeleton():
        model = build(cfg)
    sd, layers = _load_weights(reader, cfg, spec, blocks, prefill_dtype)
    for name, layer in layers.items():
        if name == "wte":
            continue
        layer.bias = sd.pop(f"{name}.bias", None)
        model.set_submodule(name, layer)
    if "wte" in layers:
        model.wte = BlockEmbedding(layers["wte"])
        if cfg.tie_embeddings:
            model.lm_head = layers["wte"]
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and "wte" not in layers:
        model.lm_head.weight = model.wte.weight
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v is not None and v.is_meta]
    if left:
        raise LmlabError(f"GGUF file gives no value for '{left[0]}'")
    tok = tokenizer_from_gguf(meta)
    # the keys lmlab.io.load's BOS rule reads, so the file need not be parsed again
    tok.gguf_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.") and not isinstance(v, list)}
    del meta, reader
    if blocks:
        pack_block_args(model)
    _trim_heap()
    if blocks and _pin_mmap_threshold():
        _heap_for_many_tokens(model)
    return model.eval(), tok
