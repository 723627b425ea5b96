"""Learning-rate schedules as pure functions of the step (so a resumed run continues exactly)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warmup from 0, then `cosine` decay to `min_lr` at `max_steps`, a `constant` rate, or
    `wsd` (warmup-stable-decay: constant, then linear decay over the last `decay_fraction`)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if schedule == "wsd":
        decay_start = max_steps - int(decay_fraction * max_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr + progress * (min_lr - lr)
    raise ValueError(f"unknown schedule '{schedule}' (cosine | constant | wsd)")
