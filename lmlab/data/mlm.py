"""Masked-language-model batches (Devlin et al. 2019, section 3.1 and appendix A.1).

Each non-special token is chosen with probability 15%; a chosen token becomes `<mask>` 80% of the
time, a random (non-special) token 10% of the time and stays unchanged 10% of the time. Targets are
the original tokens at the chosen positions and -100 elsewhere. A row where nothing was chosen gets
one chosen position, so a batch always has a loss.

The masking of batch i is drawn from a generator seeded with (seed, i) alone, so a resumed run masks
exactly as the uninterrupted one would (the windows come from a resumable sampler of lmlab/data/stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmlab.data.stream import CorruptedWindows

MASK_PROB = 0.15        # Devlin et al. 2019: 15% of the tokens are chosen for prediction
REPLACE_MASK = 0.8      # ... of which 80% become <mask>,
REPLACE_RANDOM = 0.1    # 10% a random token, and the remaining 10% stay unchanged


@dataclass(kw_only=True)
class MaskingConfig:
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    mask_prob: float = MASK_PROB
    replace_mask: float = REPLACE_MASK
    replace_random: float = REPLACE_RANDOM


def mask_tokens(tokens: torch.Tensor, cfg: MaskingConfig,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for a [B, T] batch of token ids; `tokens` is not modified."""
    ids = tokens.numpy()
    special = np.isin(ids, np.asarray(cfg.special_ids, dtype=ids.dtype))
    chosen = (rng.random(ids.shape) < cfg.mask_prob) & ~special
    for r in np.flatnonzero(~chosen.any(axis=1)):  # at least one prediction per row that has a candidate
        cands = np.flatnonzero(~special[r])
        if len(cands):
            chosen[r, rng.choice(cands)] = True
    u = rng.random(ids.shape)
    to_mask = chosen & (u < cfg.replace_mask)
    to_random = chosen & (u >= cfg.replace_mask) & (u < cfg.replace_mask + cfg.replace_random)
    normal = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(cfg.special_ids, dtype=np.int64))
    inputs = ids.astype(np.int64, copy=True)
    inputs[to_mask] = cfg.mask_id
    inputs[to_random] = rng.choice(normal, size=int(to_random.sum()))
    targets = np.where(chosen, ids, -100).astype(np.int64)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class MaskedWindows(CorruptedWindows):
    """Wraps a window sampler: its inputs, masked; the next-token targets are dropped."""

    kind, stream = "mlm", 1  # stream: a random stream apart from the windows'

    def corrupt(self, x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(x, self.cfg, rng)
