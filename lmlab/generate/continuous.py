"""Continuous batching: sequences join and leave one running decode batch at every step.

`SlotDecoder` owns one preallocated KV cache of `max_batch` rows x `max_len` slots. A new sequence is
prefilled alone into the first free row (`KVCache.row`) as soon as it arrives, and samples its first
token from that prefill; every `step()` then feeds one token per occupied row (rows 0..n-1, a
`KVCache.rows` view, each row at its own length and position). A sequence that ends (EOS, its token
budget, a stop string, a client gone) leaves at once: the last occupied row moves into its place
(`KVCache.move`), so the batch stays dense and the free rows cost nothing.

Sampling is the engine's (lmlab/generate/engine.py): greedy rows take the argmax, others draw with
`lmlab.nn.sampling.sample` from their own generator seeded by their `seed`, so a sequence's tokens do
not depend on what else is in the batch (up to the float rounding of batched kernels).

With LoRA adapters (`adapters`, lmlab/nn/multi_lora.py) each slot names its adapter, and the decoder
tells the wrapped layers which row uses which before every forward, so rows of different adapters
decode in one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate.engine import SamplingConfig
from lmlab.nn.multi_lora import AdapterRows
from lmlab.nn.sampling import sample


@dataclass
class TokenInfo:
    """One position's token with, when asked, its log-probability and the top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Slot:
    """One sequence in the batch: its prompt, its settings and what it has produced so far."""

    prompt: list[int]
    cfg: SamplingConfig
    logprobs: int | None = None        # None: none; k: the sampled token's and the top k's
    prompt_logprobs: bool = False       # echo: the prompt's tokens scored too (the first is None)
    adapter: int = 0                    # its LoRA adapter (lmlab/nn/multi_lora.py); 0: the base model
    n_new: int = 0
    last: int = -1
    generator: torch.Generator | None = field(default=None, repr=False)


def _info(logits: torch.Tensor, token: int, k: int | None) -> TokenInfo:
    if k is None:
        return TokenInfo(token)
    lp = F.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        vals, idx = lp.topk(k)
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenInfo(token, float(lp[token]), top)


class SlotDecoder:
    """See the module docstring. Not thread-safe: one thread (the server's scheduler) drives it."""

    def __init__(self, model: nn.Module, *, max_batch: int, max_len: int, eos_id: int | None,
                 adapters: AdapterRows | None = None):
        if not hasattr(model, "make_kv_cache"):
            raise LmlabError("continuous batching needs a model with a KV cache")
        self.model, self.eos_id = model.eval(), eos_id
        self.adapters = adapters      # set before each forward: the adapter of each row
        self.max_len = min(max_len, model.config.block_size)
        self.cache = model.make_kv_cache(max_batch, self.max_len)
        self.device = next(model.parameters()).device
        self.slots: list[Slot] = []   # row r of the cache holds slots[r]

    @property
    def max_batch(self) -> int:
        return self.cache.batch_size

    @property
    def free(self) -> int:
        return self.max_batch - len(self.slots)

    def budget(self, slot: Slot) -> int:
        """How many new tokens the slot may still take: its own limit, and the room left in its row."""
        return min(slot.cfg.max_new_tokens, self.max_len - len(slot.prompt))

    def _pick(self, logits: torch.Tensor, slot: Slot) -> int:
        if slot.cfg.temperature <= 0:
            return int(logits.argmax(-1))
        return int(sample(logits[None], temperature=slot.cfg.temperature, top_k=slot.cfg.top_k,
                          top_p=slot.cfg.top_p, generator=slot.generator)[0])

    @torch.no_grad()
    def add(self, slot: Slot) -> tuple[list[TokenInfo | None], TokenInfo]:
        """Prefill `slot`'s prompt into a free row and sample its first token. Returns (the prompt's
        scored tokens if `prompt_logprobs`, else [], the first new token)."""
        if not self.free:
            raise RuntimeError("no free row in the batch")
        if not slot.prompt or len(slot.prompt) >= self.max_len:
            raise LmlabError(f"the prompt has {len(slot.prompt)} tokens; the context holds {self.max_len}")
        r = len(self.slots)
        self.cache.clear(r)
        slot.generator = torch.Generator(device=self.device)
        slot.generator.manual_seed(slot.cfg.seed if slot.cfg.seed is not None else torch.seed())
        x = torch.tensor([slot.prompt], device=self.device)
        self._route([slot])
        keep = 0 if slot.prompt_logprobs else 1
        logits = self.model(x, kv_cache=self.cache.row(r), logits_to_keep=keep).logits[0]
        scored: list[TokenInfo | None] = []
        if slot.prompt_logprobs:
            scored = [None] + [_info(logits[t - 1], slot.prompt[t], slot.logprobs or 0)
                               for t in range(1, len(slot.prompt))]
        self.slots.append(slot)
        first = self._pick(logits[-1], slot)
        slot.last, slot.n_new = first, 1
        return scored, _info(logits[-1], first, slot.logprobs)

    def _route(self, slots: list[Slot]) -> None:
        if self.adapters is not None:
            self.adapters.set([s.adapter for s in slots])
        elif any(s.adapter for s in slots):
            raise LmlabError("a sequence asks for a LoRA adapter; this decoder has none")

    def remove(self, slot: Slot) -> None:
        """`slot` leaves the batch; the last occupied row takes its place."""
        r = self.slots.index(slot)
        last = len(self.slots) - 1
        if r != last:
            self.cache.move(last, r)
            self.slots[r] = self.slots[last]
        else:
            self.cache.clear(r)
        self.slots.pop()

    def finished(self, slot: Slot) -> bool:
        """Whether the slot's last token ended it (EOS or its budget)."""
        return slot.last == self.eos_id or slot.n_new >= self.budget(slot)

    @torch.no_grad()
    def step(self) -> list[tuple[Slot, TokenInfo]]:
        """One new token for every occupied row (the caller removes the finished ones first)."""
        n = len(self.slots)
        if not n:
            return []
        last = torch.tensor([[s.last] for s in self.slots], device=self.device)
        self._route(self.slots)
        logits = self.model(last, kv_cache=self.cache.rows(0, n)).logits[:, -1]
        out = []
        greedy = logits.argmax(-1).tolist()  # the one host sync of a step for greedy rows
        for j, s in enumerate(self.slots):
            t = greedy[j] if s.cfg.temperature <= 0 else self._pick(logits[j], s)
            s.last, s.n_new = t, s.n_new + 1
            out.append((s, _info(logits[j], t, s.logprobs)))
        return out


__all__ = ["SamplingConfig", "Slot", "SlotDecoder", "TokenInfo"]
