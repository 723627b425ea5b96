"""Activation checkpointing, applied to a model from outside it (`--train.checkpointing`).

Each transformer `Block` keeps only its input during the forward pass and recomputes its activations
in the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): activation
memory falls from O(layers x block internals) to O(layers x one hidden state), for about one more
forward pass of compute. PyTorch's own wrapper does the work (non-reentrant checkpointing, as
torchtitan applies it); it strips its prefix from state-dict keys, so checkpoints keep the plain names.
"""

from __future__ import annotations

import logging
from functools import partial

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from lmlab.nn.block import Block

log = logging.getLogger(__name__)


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every `Block` of `model` in place; return how many were wrapped."""
    n = sum(isinstance(m, Block) for m in model.modules())
    if n == 0:
        log.warning("activation checkpointing: %s has no transformer blocks; nothing to checkpoint",
                    type(model).__name__)
        return 0
    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, Block))
    return n
