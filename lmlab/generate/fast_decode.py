"""A lean decoding step for Llama-style decoders quantized onto lmlab's block kernels.

`model(token, kv_cache=cache)` runs ~45 small PyTorch ops and module calls per layer. For one token
of a 135M model each costs a few microseconds, and together (~6 ms a token on SmolLM2-135M) they
weighed as much as reading the weights. `FastDecoder` does the same arithmetic as `DecoderLM.forward`
for one new token -- pre-RMSNorm blocks, half-split RoPE, grouped-query attention over the KV cache,
SwiGLU, residuals -- as one numba call per layer (`quant_kernels._decode_layer`) on preallocated
buffers, with the kernels of lmlab/nn/quant_kernels.py on block-major copies of the quantized weights
(made in `__init__`). On more than one thread (`torch.set_num_threads`) a team of threads decodes each
token, each running every layer on its share of the rows and meeting the others at spin barriers
(`_Team`, `quant_kernels._decode_layer_split`; docs/gguf/README.md). It applies only where every piece matches
(`FastDecoder.build` returns None otherwise), and it is tested against the model's own forward
(tests/test_fast_decode.py).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref

import numpy as np
import torch
from torch import nn

from lmlab.nn import quant_int
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
            and blocks and cache.k.dtype in (torch.float32, torch.float16) and cache.k.shape[1] == 1
            and cache.key_mask is None and cache.k.is_contiguous() and cache.k.device.type == "cpu"):
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
    [n, k'/4, 4] view of a contiguous [k'/4, n, 4] array (`kernels.to_block_major`), the same values, so
    the decoding kernels read it without a copy and the model keeps one copy of its weights (`block_args`)."""
    if not kernels.block_major(m.qs):
        old = m.qs
        m.qs = kernels.to_block_major(old)
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
        self.scratch = torch.empty(self.nh // self.nkv * cache.max_len, dtype=f)  # one score row per grouped head
        # numpy views (zero-copy) of the buffers, weights and cache, as the numba layer step takes them
        bufs = tuple(t.numpy() for t in (self.x, self.h, self.o, self.qkv, self.att, self.gu, self.act, self.scratch))
        # activations of the decoding matmuls: fp32, or int8 planes (kernels.PLANES added to each kind)
        self.activations = getattr(model, "decode_activations", "fp32")
        planes = quant_int.MODES[self.activations]
        self.layers = []
        for blk in model.blocks:
            lin = []
            for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.up, blk.mlp.down):
                kind, *rest = _packed(m, model)
                lin += [kind + kernels.PLANES * planes, *rest]
            b = blk.attn.qkv.bias
            b = np.zeros(0, np.float32) if b is None else b.detach().float().contiguous().numpy()
            self.layers.append((*bufs, blk.norm1.weight.detach().numpy(), blk.norm2.weight.detach().numpy(),
                                np.float32(blk.norm1.eps), np.float32(blk.norm2.eps), *lin, b))
        # [layers, nkv, max_len, hd]; an fp16 cache as its bit patterns (the kernels convert exactly)
        self.kc, self.vc = kernels.cache_array(cache.k[:, 0]), kernels.cache_array(cache.v[:, 0])
        head = model.lm_head
        # a block-quantized output layer (Q8_0 by default) through the decoding kernels too; else the module
        self.head = _packed(head, model) if _kernel_linear(head) else None
        if self.head is not None:
            self.head = (self.head[0] + kernels.PLANES * planes, *self.head[1:])
        # torch's thread count when built: more than one, and every matrix in the kernels, decodes on a
        # team of threads (`_split_step`)
        self.threads = kernels.set_threads(torch.get_num_threads())
        self.split = self.threads > 1 and self.head is not None
        self.keep = model  # the weights stay alive while their views are used
        self.team = _Team(self, self.threads) if self.split else None  # started here, not at the first step

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
        if self.split:
            return self._split_step(pos, cos, sin, scale)
        # numba's pool for the largest matrices: it and torch's take turns (no torch op runs meanwhile)
        self.threads = kernels.set_threads(self.threads)
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

    def _split_step(self, pos: int, cos: np.ndarray, sin: np.ndarray, scale: np.float32) -> torch.Tensor:
        """The step on `self.threads` threads: this one and the team's workers each run every layer and
        the output layer on their share of the rows (`kernels._decode_layer_split`)."""
        team = self.team
        if team is None:  # a failed thread may still be finishing its part of the shared buffers
            raise RuntimeError("a decoding thread failed in an earlier step: build a new decoder")
        logits = torch.empty(1, self.head[1].shape[2])
        job = (team.count, pos, cos, sin, scale, logits.numpy())
        for q in team.jobs:
            q.put(job)
        count = -1
        try:
            count = _run_token(team, 0, *job)
        finally:
            if count < 0 or team.errors:  # a worker failed, or this thread: none waits for the other
                self.team = None
                team.flags[kernels.SPLIT_LINE * team.nt] = 1
        if count < 0 or team.errors:
            raise RuntimeError(f"a decoding thread failed: {team.errors[0] if team.errors else 'stopped'}")
        team.count = count
        self.cache.advance(1)
        return logits

    def quiet_torch(self) -> contextlib.AbstractContextManager:
        """A context for the caller's own torch ops between steps (sampling): on one thread while a team
        decodes. A torch op on several threads leaves its OpenMP workers spinning for a while after it;
        on the cores the team needs that halved decoding speed (SmolLM2 at 2 threads: 70 vs 145 tok/s)."""
        return _torch_threads(1) if self.split else contextlib.nullcontext()


@contextlib.contextmanager
def _torch_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class _Team:
    """`nt - 1` worker threads that decode each token beside the calling thread, each on its own share
    of every matrix's rows; they meet at spin barriers inside the kernels (counters in `flags`) and wait
    between tokens on a queue (no spinning while nothing is generated). The workers stop when the team is
    garbage-collected."""

    def __init__(self, dec: FastDecoder, nt: int):
        from numba import typed

        self.nt, self.count, self.errors = nt, 0, []
        self.flags = np.zeros(kernels.SPLIT_LINE * (nt + 1), dtype=np.int64)  # nt counters, then "give up"
        f = torch.float32
        per = []  # each thread's layers: its own normalised input h and attention scratch, the rest shared
        for _ in range(nt):
            h = torch.empty_like(dec.x).numpy()
            scratch = torch.empty(dec.scratch.numel(), dtype=f).numpy()
            layers = typed.List()  # one numba call per token runs them all
            for args in dec.layers:
                layers.append((args[0], h, *args[2:7], scratch, *args[8:]))
            per.append(layers)
        norm_f = dec.model.norm_f
        self.shared = (per, dec.kc, dec.vc, dec.nh, dec.nkv, dec.x.numpy(), norm_f.weight.detach().numpy(),
                       np.float32(norm_f.eps), dec.head)
        self.jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(nt - 1)]
        for t, q in enumerate(self.jobs, start=1):
            threading.Thread(target=_worker, args=(weakref.ref(self), t, q), daemon=True,
                             name=f"lmlab-decode-{t}").start()
        weakref.finalize(self, _stop, self.jobs)


def _run_token(team: _Team, t: int, count: int, pos: int, cos: np.ndarray, sin: np.ndarray, scale: np.float32,
               logits: np.ndarray) -> int:
    """Thread t's share of one token: every layer, then the output layer; the barrier count after it
    (negative: a thread gave up)."""
    per, kc, vc, nh, nkv, x, norm, eps, head = team.shared
    return kernels._decode_token_split(t, team.nt, team.flags, count, per[t], cos, sin, kc, vc, pos, nh, nkv, scale,
                                       norm, eps, *head, logits)


def _worker(ref: weakref.ref, t: int, jobs: queue.SimpleQueue) -> None:
    """Worker t: runs its share of each token put on `jobs` until None arrives (the team is collected)."""
    while (job := jobs.get()) is not None:
        team = ref()
        if team is None:
            return
        try:
            _run_token(team, t, *job)
        except Exception as e:  # noqa: BLE001 - reported by the calling thread, which stops waiting
            team.errors.append(e)
            team.flags[kernels.SPLIT_LINE * team.nt] = 1
        del team, job


def _stop(jobs: list[queue.SimpleQueue]) -> None:
    for q in jobs:
        q.put(None)
