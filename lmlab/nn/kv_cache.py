"""A preallocated key/value cache, held outside the model and passed into its forward.

Memory: [n_layer, B, n_kv_head, max_len, head_dim] for keys and for values, allocated once. Every row
of the batch is its own sequence with its own length (`lengths[b]`: cache slots filled) and its own
position (`positions[b]`: real tokens seen, the position id of its next token), so rows of different
lengths decode together, and a row can leave (`keep`) or a new one be prefilled into a free slot
(`clear` + `row`) without touching the others.

One forward of the model over T new tokens per row is one *step*: `begin(T, new_mask)` (the model
calls it before its layers) fixes where each row's tokens go (slots lengths[b] .. lengths[b] + T - 1),
their position ids and the attention mask; every layer's `append` writes there; `commit()` (after the
layers) moves the lengths on. Appending costs O(T), and a decode step attends over O(length) keys.

Padding: `new_mask` ([B, T] bool, True = real token) may hold pads on either side. Leading pads (left
padding, how batched prompts are prefilled) stay in the cache, masked out by `key_mask` for every
later step; trailing pads (right padding) are not counted in the row's length, so the row's next
token overwrites them. Position ids count real tokens only, so a padded row sees the positions of its
unpadded self (as `transformers.generate` computes them).

Rolling windows: a sliding-window layer (local window w plus g global positions, see
lmlab/nn/attention_backends.py) never reads a key older than w positions unless it is global, so
`windows` gives such layers a ring of g + w slots instead of a max_len row: the global positions stay,
the last w rotate (StreamingLLM's sink tokens plus its window, Xiao et al. 2023). Keys are stored after
RoPE, so a key's slot does not matter to attention, only its position, which the ring records.
Rings take rows of equal length without padding (one shared position per slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class CacheStep:
    """Where one forward's T new tokens per row go (see `KVCache.begin`)."""

    T: int
    start: int | None            # every row's first new slot when they all agree (None: they differ)
    slots: torch.Tensor | None   # [B, T] slot of each new token when rows differ (on the cache's device)
    end: int                     # keys [0, end) are read by this step's attention
    position_ids: torch.Tensor   # [B, T] (or [1, T] when every row agrees and nothing is padded)
    attn_mask: torch.Tensor | None  # [B, 1, T, end] bool, True = may attend (causality included); None:
    #                                 plain causal attention from `start`, no pads
    new_lengths: torch.Tensor    # [B] lengths after the step
    new_positions: torch.Tensor  # [B] positions after the step
    # rolling windows (None without rings): ring slots read this step, the new tokens' positions, and
    # which new tokens go to which slots
    ring_read: torch.Tensor | None = None   # [g + w] bool: slots holding a key before this step
    new_pos: torch.Tensor | None = None     # [T] positions of the new tokens
    ring_src: torch.Tensor | None = None    # indices into the T new tokens that the ring keeps
    ring_dst: torch.Tensor | None = None    # their slots


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 windows: Sequence[tuple[int, int] | None] | None = None):
        """`windows[i]` = (w, g) gives layer i a rolling ring of g + w slots (a sliding-window layer:
        window w, g global positions); None (or no `windows`) a full row of max_len slots."""
        windows = list(windows) if windows is not None else [None] * n_layer
        if len(windows) != n_layer:
            raise ValueError(f"windows has {len(windows)} entries for {n_layer} layers")
        full = [i for i, wg in enumerate(windows) if wg is None]
        ringed = [i for i, wg in enumerate(windows) if wg is not None]
        if len({windows[i] for i in ringed}) > 1:
            raise ValueError("rolling KV cache: every sliding-window layer needs the same window and globals")
        # layer -> its index in the full buffers (k, v) or in the rings (ring_k, ring_v)
        self.full_index = {layer: j for j, layer in enumerate(full)}
        self.ring_index = {layer: j for j, layer in enumerate(ringed)}
        self.window = windows[ringed[0]] if ringed else None
        shape = (len(full), batch_size, n_kv_head, max_len, head_dim)
        # zeroed, not left uninitialised: a row shorter than the longest reads slots past its length
        # (masked out, weight 0), and 0 * a NaN of uninitialised memory would still be NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        ring = sum(self.window) if self.window else 0
        self.ring_k = torch.zeros((len(ringed), batch_size, n_kv_head, ring, head_dim), dtype=dtype, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_pos = torch.full((ring,), -1, dtype=torch.long)  # position held by each slot; -1: empty
        self.max_len = max_len
        # host-side bookkeeping (small, so no device sync is needed to plan a step)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)    # slots filled per row
        self.positions = torch.zeros(batch_size, dtype=torch.long)  # real tokens per row
        self.key_mask: torch.Tensor | None = None  # [B, max_len] bool (device), allocated on the first pad
        self.step: CacheStep | None = None
        self._parent_rows = False  # a `row()` view: bookkeeping shared with its parent

    # -- shape --------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def pos(self) -> int:
        """The longest row's length (every row's, when they agree)."""
        return int(self.lengths.max()) if len(self.lengths) else 0

    def uniform(self) -> int | None:
        """The common length of every row, or None when rows differ."""
        if not len(self.lengths):
            return 0
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        return lo if lo == hi else None

    # -- one forward ----------------------------------------------------------------------------
    def begin(self, T: int, new_mask: torch.Tensor | None = None) -> CacheStep:
        """Plan a forward over T new tokens per row; `new_mask` ([B, T], True = real token) marks pads."""
        B, dev = self.batch_size, self.k.device
        if new_mask is not None:
            new_mask = new_mask.to(device=dev, dtype=torch.bool)
            if bool(new_mask.all()):
                new_mask = None
        start = self.uniform()
        end = self.pos + T
        if end > self.max_len and self.full_index:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.ring_index and (new_mask is not None or start is None or self.key_mask is not None):
            raise ValueError("a rolling (sliding-window) KV cache decodes rows of equal length without "
                             "padding: decode such prompts one at a time")
        steps = torch.arange(T)
        if new_mask is None:
            real = torch.full((B,), T, dtype=torch.long)
            grow = real
            offsets = steps[None].expand(B, T)
        else:
            m = new_mask.cpu()
            real = m.sum(1)
            # trailing pads are not kept: the row's next token takes their slot
            last = torch.where(m, steps[None] + 1, 0).max(1).values
            grow = last
            offsets = (m.long().cumsum(1) - 1).clamp(min=0)
        slots = None if start is not None else (self.lengths[:, None] + steps[None]).to(dev)
        if new_mask is None and start is not None and (self.positions == self.positions[0]).all():
            position_ids = (int(self.positions[0]) + steps)[None].to(dev)  # [1, T]: shared by every row
        else:
            position_ids = (self.positions[:, None] + offsets).to(dev)
        if new_mask is not None and self.key_mask is None:
            if self._parent_rows:
                raise ValueError("a row view of a KV cache takes no pads (prefill the row's prompt alone)")
            self.key_mask = torch.ones(B, self.max_len, dtype=torch.bool, device=dev)
        if self.key_mask is not None:  # record which of the new slots are real tokens
            new = new_mask if new_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
            if start is not None:
                self.key_mask[:, start:start + T] = new
            else:
                self.key_mask.scatter_(1, slots, new)
        attn_mask = None
        if start is None or self.key_mask is not None:
            # query t of row b sits in slot lengths[b] + t: it sees the filled slots up to its own that
            # hold real tokens, and always its own key (an all-masked pad query would give NaN, which
            # reaches real tokens in the next layer through the pad's value: 0 * NaN is NaN)
            q = (self.lengths.to(dev)[:, None] + steps.to(dev)[None])[:, :, None]  # [B, T, 1]
            keys = torch.arange(end, device=dev)[None, None]                      # [1, 1, end]
            attn_mask = keys <= q
            if self.key_mask is not None:
                attn_mask = (attn_mask & self.key_mask[:, None, :end]) | (keys == q)
            attn_mask = attn_mask[:, None]
        self.step = CacheStep(T, start, slots, end, position_ids, attn_mask, self.lengths + grow,
                              self.positions + real)
        if self.ring_index:
            self._plan_ring(self.step)
        return self.step

    def _plan_ring(self, s: CacheStep) -> None:
        """Which ring slots this step reads and where its new keys go: a global position (< g) keeps
        slot p, a local one slot g + (p - g) mod w; of the new tokens only the globals and the last w
        are stored (an earlier one would be overwritten within the same step)."""
        w, g = self.window
        p0 = int(self.positions[0])
        pos = torch.arange(p0, p0 + s.T)
        kept = (pos < g) | (pos >= p0 + s.T - w)
        src = kept.nonzero().flatten()
        dst = torch.where(pos[src] < g, pos[src], g + (pos[src] - g) % w)
        dev = self.ring_k.device
        s.ring_read, s.new_pos = (self.ring_pos >= 0).to(dev), pos.to(dev)
        s.ring_src, s.ring_dst = src.to(dev), dst.to(dev)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v ([B, H, T, D]) for `layer`; return the keys and values [B, H, end, D]
        this step attends over (mask them with `step.attn_mask`)."""
        s = self.step
        if s is None or s.T != k.shape[2]:
            raise RuntimeError("KVCache.append() outside a step: the model calls begin(T) before its layers")
        if layer in self.ring_index:
            raise RuntimeError(f"layer {layer} has a rolling window: use append_window()")
        layer = self.full_index[layer]
        if s.start is not None:
            self.k[layer, :, :, s.start:s.start + s.T] = k
            self.v[layer, :, :, s.start:s.start + s.T] = v
        else:  # each row at its own slots
            rows = torch.arange(self.batch_size, device=k.device)[:, None]
            self.k[layer][rows, :, s.slots] = k.transpose(1, 2)
            self.v[layer][rows, :, s.slots] = v.transpose(1, 2)
        # a cache narrower than the model (fp16 for a quantized model) is read back in k's dtype: this
        # step attends over the stored (rounded) keys and values, as later steps will
        return self.k[layer, :, :, :s.end].to(k.dtype), self.v[layer, :, :, :s.end].to(v.dtype)

    def rolling(self, layer: int) -> bool:
        return layer in self.ring_index

    def append_window(self, layer: int, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ring layer's `append`: returns the keys and values this step attends over (the ring's
        filled slots, then the T new ones) and their positions, for the window mask; then stores the
        new keys the ring keeps."""
        s = self.step
        if s is None or s.T != k.shape[2] or s.ring_read is None:
            raise RuntimeError("KVCache.append_window() outside a step: the model calls begin(T) first")
        rk, rv = self.ring_k[self.ring_index[layer]], self.ring_v[self.ring_index[layer]]
        # copies: read before the ring is written (in k's dtype, as `append` reads)
        keys = torch.cat([rk[:, :, s.ring_read].to(k.dtype), k], dim=2)
        values = torch.cat([rv[:, :, s.ring_read].to(v.dtype), v], dim=2)
        positions = torch.cat([self.ring_pos.to(k.device)[s.ring_read], s.new_pos])
        rk[:, :, s.ring_dst] = k[:, :, s.ring_src]
        rv[:, :, s.ring_dst] = v[:, :, s.ring_src]
        return keys, values, positions

    def commit(self) -> None:
        """End the step: every row's length and position move past its new tokens."""
        if self.step is None:
            raise RuntimeError("KVCache.commit() without begin()")
        if self.step.ring_dst is not None:
            self.ring_pos[self.step.ring_dst.cpu()] = self.step.new_pos.cpu()[self.step.ring_src.cpu()]
        self.lengths.copy_(self.step.new_lengths)
        self.positions.copy_(self.step.new_positions)
        self.step = None

    def advance(self, n: int) -> None:
        """Every row moves n slots and positions, for writes made outside `append` (FastDecoder)."""
        self.lengths += n
        self.positions += n

    # -- rows -----------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes the cached history of row `index[i]` ([B] long, repeats allowed): beam search
        moves each beam's history to the beams that continue it. Only the filled slots are copied."""
        n = self.pos
        idx = index.to(self.k.device)
        self.k[:, :, :, :n] = self.k[:, idx, :, :n]
        self.v[:, :, :, :n] = self.v[:, idx, :, :n]
        self.ring_k[:] = self.ring_k[:, idx]
        self.ring_v[:] = self.ring_v[:, idx]
        if self.key_mask is not None:
            self.key_mask[:, :n] = self.key_mask[idx, :n]
        cpu = index.cpu()
        self.lengths, self.positions = self.lengths[cpu].clone(), self.positions[cpu].clone()

    def keep(self, index: torch.Tensor | list[int], extra: int = 0) -> None:
        """Keep only rows `index` (in that order; e.g. the rows still decoding), with room for `extra`
        more slots past the longest (0: the capacity stays). The filled slots are copied into new,
        smaller buffers, so the rows that left free their memory."""
        cpu = torch.as_tensor(index, dtype=torch.long).cpu()
        idx = cpu.to(self.k.device)
        n = self.pos
        max_len = n + extra if extra else self.max_len
        shape = (self.k.shape[0], len(cpu), self.k.shape[2], max_len, self.k.shape[4])
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :, :n] = self.k[:, idx, :, :n]
        v[:, :, :, :n] = self.v[:, idx, :, :n]
        self.k, self.v, self.max_len = k, v, max_len
        self.ring_k, self.ring_v = self.ring_k[:, idx].clone(), self.ring_v[:, idx].clone()
        if self.key_mask is not None:
            mask = torch.ones(len(cpu), max_len, dtype=torch.bool, device=self.k.device)
            mask[:, :n] = self.key_mask[idx, :n]
            self.key_mask = mask
        self.lengths, self.positions = self.lengths[cpu].clone(), self.positions[cpu].clone()

    def clear(self, rows: int | list[int]) -> None:
        """Empty rows (their sequences ended), leaving free slots for new sequences."""
        self._rows_alone("clear")
        self.lengths[rows] = 0
        self.positions[rows] = 0
        if self.key_mask is not None:
            self.key_mask[rows] = True

    def row(self, i: int) -> KVCache:
        """A one-row cache sharing row `i`'s memory and bookkeeping: prefill a new sequence into a free
        row with `model(prompt, kv_cache=cache.row(i))` while the other rows keep theirs."""
        return self.rows(i, i + 1)

    def rows(self, lo: int, hi: int) -> KVCache:
        """A cache of rows lo..hi-1 sharing their memory and bookkeeping (continuous batching decodes
        the occupied rows 0..n-1 of a preallocated cache without touching the free ones)."""
        self._rows_alone("rows")
        view = KVCache.__new__(KVCache)
        view.full_index, view.ring_index, view.window = self.full_index, {}, None
        view.ring_k = view.ring_v = self.ring_k[:, lo:hi]
        view.ring_pos = self.ring_pos
        view.k, view.v, view.max_len = self.k[:, lo:hi], self.v[:, lo:hi], self.max_len
        view.lengths, view.positions = self.lengths[lo:hi], self.positions[lo:hi]  # views: updated in place
        view.key_mask = self.key_mask[lo:hi] if self.key_mask is not None else None
        view.step, view._parent_rows = None, True
        return view

    def move(self, src: int, dst: int) -> None:
        """Row `dst` takes row `src`'s sequence (its filled slots only) and `src` is cleared: a row that
        leaves the middle of a batch is filled by the last one, so the occupied rows stay 0..n-1."""
        self._rows_alone("move")
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        if self.key_mask is not None:
            self.key_mask[dst] = self.key_mask[src]
        self.lengths[dst], self.positions[dst] = self.lengths[src], self.positions[src]
        self.clear(src)

    def _rows_alone(self, what: str) -> None:
        if self.ring_index:
            raise ValueError(f"KVCache.{what}(): rows of a rolling (sliding-window) cache share their ring "
                             "positions, so they cannot start or leave separately")

    def reset(self) -> None:
        self.ring_pos.fill_(-1)
        self.lengths.zero_()
        self.positions.zero_()
        self.key_mask = None
        self.step = None
