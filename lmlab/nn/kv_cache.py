"""A preallocated key/value cache, held outside the model and passed into its forward.

Every layer writes its new keys/values at positions [pos, pos + T); the model advances `pos` once
after all layers ran. Appending therefore costs O(T), and a decode step attends over O(pos) keys.

For padded batches the cache also remembers which cached positions are real tokens (`key_mask`),
so later steps keep ignoring the pads of the prompt and count positions from each row's first token.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        # uninitialised: only positions < pos are ever read, and untouched pages cost no memory
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0
        self.key_mask: torch.Tensor | None = None  # [B, max_len] bool, allocated on first padded input

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ([B, H, T, D]) for `layer` after the cached ones; return all keys and values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_mask(self, new: torch.Tensor) -> torch.Tensor:
        """Record which of the next positions are real tokens ([B, T] bool); return the mask of every
        key so far ([B, pos + T])."""
        end = self.pos + new.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.key_mask is None:  # everything cached so far was a real token
            self.key_mask = torch.ones(self.k.shape[1], self.max_len, dtype=torch.bool, device=self.k.device)
        self.key_mask[:, self.pos:end] = new
        return self.key_mask[:, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes the cached history of row `index[i]` ([B] long, repeats allowed): beam search
        moves each beam's history to the beams that continue it. Only the filled positions are copied."""
        n = self.pos
        self.k[:, :, :, :n] = self.k[:, index, :, :n]
        self.v[:, :, :, :n] = self.v[:, index, :, :n]
        if self.key_mask is not None:
            self.key_mask[:, :n] = self.key_mask[index, :n]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0
        self.key_mask = None
