"""A lean decoding step for Llama-style decoders quantized onto lmlab's block kernels.

`model(token, kv_cache=cache)` runs ~45 small PyTorch ops and module calls per layer. For one token
of a 135M model each costs a few microseconds, and together (~6 ms a token on SmolLM2-135M) they
weighed as much as reading the weights. `FastDecoder` does the same arithmetic as `DecoderLM.forward`
for one new token -- pre-RMSNorm blocks, half-split RoPE, grouped-query attention over the KV cache,
SwiGLU, residuals -- as one numba call per layer (`quant_kernels._decode_layer`) on preallocated
buffers, with the kernels of lmlab/nn/quant_kernels.py on block-major copies of the quantized weights
(made in `__init__`). It applies only where every piece matches
(`FastDecoder.build` returns None otherwise), and it is tested against the model's own forward
(tests/test_fast_decode.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from lmlab.nn import quant_kernels as kernels
from lmlab.nn.block import Block
from lmlab.nn.kv_cache import KVCache
from lmlab.nn.mlp import ACTIVATIONS
from lmlab.nn.position import RotaryEmbedding
from lmlab.nn.quant import FastRMSNorm, GroupLinear, Int4Linear, Q8Embedding, Q8Linear, block_args


def _kernel_linear(m: nn.Module, bias: bool = False) -> bool:
    return ((isinstance(m, Int4Linear) and m.packed is None) or isinstance(m, (Q8Linear, GroupLinear))) \
        and (bias or m.bias is None)


def _fits(model: nn.Module, cache: KVCache) -> bool:
    blocks = getattr(model, "blocks", None)
    if not (kernels.available() and isinstance(getattr(model, "rope", None), RotaryEmbedding)
            and getattr(model, "wpe", 1) is None and isinstance(getattr(model, "norm_f", None), FastRMSNorm)
            and blocks and cache.k.dtype == torch.float32 and cache.k.shape[1] == 1 and cache.key_mask is None
            and cache.k.is_contiguous() and cache.k.device.type == "cpu"):
        return False
    hd = blocks[0].attn.head_dim
    if hd % 16 or hd > 256 or model.rope.head_dim != hd:
        return False
    for b in blocks:
        a, m = b.attn, b.mlp
        if not (type(b) is Block and not b.post_norm and not hasattr(b, "cross") and a.causal
                and a.backend != "sliding_window" and a.alibi_slopes is None  # the kernel attends fully
                and isinstance(b.norm1, FastRMSNorm) and isinstance(b.norm2, FastRMSNorm)
                and m.gated and m.act is ACTIVATIONS["silu"] and a.head_dim == hd
                and _kernel_linear(a.qkv, bias=True) and all(_kernel_linear(x) for x in (a.proj, m.up, m.down))):
            return False
    return True


def _packed(m: nn.Module, model: nn.Module) -> tuple:
    """A quantized linear's arguments for `_decode_layer`, its weights block-major and row-minor.

    The codes are stored so once, in place (GGUF layers are loaded so): `qs` [n, k'] becomes the
    transpose of a contiguous [k', n] array, the same values, so the decoding kernels read it without
    a copy and the model keeps one copy of its weights (`block_args`)."""
    if m.qs.is_contiguous():
        old = m.qs
        m.qs = old.T.contiguous().T
        for e in model.modules():  # an embedding sharing the tied output layer's codes follows them
            if isinstance(e, Q8Embedding) and e.qs is old:
                e.qs = m.qs
    return block_args(m)


class FastDecoder:
    """`step(token)` -> logits [1, vocab] of the next position, appending to `cache` like `model(...)`."""

    def __init__(self, model: nn.Module, cache: KVCache):
        self.model, self.cache = model, cache
        b0 = model.blocks[0]
        self.nh, self.nkv, self.hd = b0.attn.n_head, b0.attn.n_kv_head, b0.attn.head_dim
        self.hidden = b0.mlp.down.in_features
        n_embd = b0.attn.proj.out_features
        f = torch.float32
        self.x, self.h, self.o = (torch.empty(1, n_embd, dtype=f) for _ in range(3))
        self.qkv = torch.empty(1, (self.nh + 2 * self.nkv) * self.hd, dtype=f)
        self.att = torch.empty(1, self.nh * self.hd, dtype=f)
        self.gu = torch.empty(1, 2 * self.hidden, dtype=f)
        self.act = torch.empty(1, self.hidden, dtype=f)
        self.scratch = torch.empty(cache.max_len, dtype=f)
        # numpy views (zero-copy) of the buffers, weights and cache, as the numba layer step takes them
        bufs = tuple(t.numpy() for t in (self.x, self.h, self.o, self.qkv, self.att, self.gu, self.act, self.scratch))
        self.layers = []
        for blk in model.blocks:
            lin = []
            for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.up, blk.mlp.down):
                lin += _packed(m, model)
            b = blk.attn.qkv.bias
            b = np.zeros(0, np.float32) if b is None else b.detach().float().contiguous().numpy()
            self.layers.append((*bufs, blk.norm1.weight.detach().numpy(), blk.norm2.weight.detach().numpy(),
                                np.float32(blk.norm1.eps), np.float32(blk.norm2.eps), *lin, b))
        self.kc, self.vc = cache.k[:, 0].numpy(), cache.v[:, 0].numpy()  # [layers, nkv, max_len, hd]
        head = model.lm_head
        # a block-quantized output layer (Q8_0 by default) through the decoding kernels too; else the module
        self.head = _packed(head, model) if _kernel_linear(head) else None
        self.threads = 1
        self.keep = model  # the weights stay alive while their views are used

    @classmethod
    def build(cls, model: nn.Module, cache: KVCache) -> FastDecoder | None:
        """The fast step for `model` and `cache`, or None where it does not apply (then use `model`)."""
        return cls(model, cache) if _fits(model, cache) else None

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        c = self.cache
        pos = c.pos
        if pos >= c.max_len:
            raise ValueError(f"KV cache full: {pos + 1} positions > max_len {c.max_len}")
        self.x.copy_(self.model.wte(token.view(1, 1)).view(1, -1))
        cos, sin = self.model.rope.cos_sin(torch.tensor([[pos]]))
        cos, sin = cos.reshape(-1).contiguous().numpy(), sin.reshape(-1).contiguous().numpy()
        scale = np.float32(self.hd ** -0.5)
        # torch's thread count for numba's pool: the two take turns (decoding runs no torch op meanwhile)
        self.threads = kernels.set_threads(torch.get_num_threads())
        with kernels.POOL if self.threads > 1 else contextlib.nullcontext():
            for i, args in enumerate(self.layers):
                kernels._decode_layer(*args, cos, sin, self.kc[i], self.vc[i], pos, self.nh, self.nkv, scale,
                                      self.threads)
        c.advance(1)
        norm_f = self.model.norm_f
        h = kernels.rms_norm(self.x, norm_f.weight, norm_f.eps)
        if self.head is None:
            return self.model.lm_head(h.view(1, 1, -1))[:, -1]
        logits = torch.empty(1, self.head[1].shape[2])
        with kernels.POOL if self.threads > 1 else contextlib.nullcontext():
            kernels._linear(*self.head, h.numpy(), logits.numpy(), self.threads)
        return logits
