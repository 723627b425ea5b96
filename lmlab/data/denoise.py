"""Denoising batches for BART (Lewis et al. 2020, section 2.2): text infilling, sentence permutation.

Text infilling: spans with lengths drawn from Poisson(lambda=3) are chosen until ~30% of the tokens are
covered; each span is replaced by ONE `<mask>` (a span of length 0 inserts a `<mask>`), so the model
must also predict how many tokens are missing. Special tokens are never masked. Sentence permutation
(optional) shuffles the `</s>`-separated pieces of a window before infilling.

Inputs are the corrupted windows, right-padded with `<pad>` to `block_size`; targets are the
original windows. Batch i is drawn from a generator seeded with (seed, i) alone, so resuming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmlab.data.stream import CorruptedWindows

MASK_RATIO = 0.3        # Lewis et al. 2020: 30% of the tokens masked (their best setting)
POISSON_LAMBDA = 3.0    # span lengths ~ Poisson(3)


@dataclass(kw_only=True)
class DenoiseConfig:
    mask_id: int
    pad_id: int
    eos_id: int
    special_ids: tuple[int, ...] = ()
    mask_ratio: float = MASK_RATIO
    poisson_lambda: float = POISSON_LAMBDA
    permute_sentences: bool = False


def permute_sentences(ids: np.ndarray, eos_id: int, rng: np.random.Generator) -> np.ndarray:
    """The `</s>`-terminated pieces of `ids` in a random order (a trailing unterminated piece too)."""
    ends = np.flatnonzero(ids == eos_id) + 1
    pieces = [p for p in np.split(ids, ends) if len(p)]
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))]) if pieces else ids


def infill(ids: np.ndarray, cfg: DenoiseConfig, rng: np.random.Generator) -> np.ndarray:
    """Text infilling of one sequence: spans replaced by one mask each (the result is shorter)."""
    n = len(ids)
    maskable = ~np.isin(ids, np.asarray(cfg.special_ids, dtype=ids.dtype))
    goal = int(round(cfg.mask_ratio * int(maskable.sum())))
    masked = np.zeros(n, dtype=bool)
    span_start = np.zeros(n + 1, dtype=bool)   # a mask token goes before position i
    covered, tries = 0, 0
    while covered < goal and tries < 4 * n:
        tries += 1
        length = int(rng.poisson(cfg.poisson_lambda))
        start = int(rng.integers(0, n))
        if masked[start] or not maskable[start]:
            continue
        span_start[start] = True
        if length == 0:  # an insertion: one <mask> where no token is missing
            continue
        stop = start
        while stop < n and stop - start < length and maskable[stop] and not masked[stop]:
            stop += 1
        masked[start:stop] = True
        covered += stop - start
    out: list[int] = []
    for i in range(n):
        if span_start[i] and not (i > 0 and masked[i - 1] and masked[i]):
            out.append(cfg.mask_id)
        if not masked[i]:
            out.append(int(ids[i]))
    return np.asarray(out, dtype=np.int64)


def corrupt(tokens: torch.Tensor, cfg: DenoiseConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted inputs padded to the window length, original targets) for a [B, T] batch."""
    B, T = tokens.shape
    x = torch.full((B, T), cfg.pad_id, dtype=torch.long)
    y = tokens.to(torch.long).clone()
    for r in range(B):
        ids = tokens[r].numpy().astype(np.int64)
        if cfg.permute_sentences:
            ids = permute_sentences(ids, cfg.eos_id, rng)
        row = infill(ids, cfg, rng)[:T]
        x[r, :len(row)] = torch.from_numpy(row)
    return x, y


class DenoisingWindows(CorruptedWindows):
    """Wraps a window sampler: (corrupted window, original window) batches."""

    kind, stream = "denoise", 2  # stream: a random stream apart from the windows'

    def corrupt(self, x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return corrupt(x, self.cfg, rng)
