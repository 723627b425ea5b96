"""Training batches per objective: the model names its objective, this registry builds its sampler.

A model class may set `objective` ("causal" when absent: next-token windows as they are). The trainer
asks `make_sampler` and never needs to know which family it trains.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lmlab.data.stream import SAMPLERS, TokenSplit
from lmlab.errors import LmlabError


def _tokenizer_with_mask(data: TokenSplit):
    from lmlab.tokenizers import load_tokenizer

    tok = load_tokenizer(data.dir)
    if tok.token_to_id(tok.specials.mask) is None:
        raise LmlabError(f"the tokenizer of {data.dir} has no mask token '{tok.specials.mask}'")
    return tok


def _mlm(windows, data: TokenSplit, seed: int):
    from lmlab.data.mlm import MaskedWindows, MaskingConfig

    tok = _tokenizer_with_mask(data)
    cfg = MaskingConfig(mask_id=tok.mask_id, vocab_size=data.meta["vocab_size"],
                        special_ids=tuple(sorted(tok.special_ids)))
    return MaskedWindows(windows, cfg, seed=seed)


def _denoise(windows, data: TokenSplit, seed: int):
    from lmlab.data.denoise import DenoiseConfig, DenoisingWindows

    tok = _tokenizer_with_mask(data)
    cfg = DenoiseConfig(mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id,
                        special_ids=tuple(sorted(tok.special_ids)))
    return DenoisingWindows(windows, cfg, seed=seed)


# objective -> (window sampler, data, seed) -> batch sampler
OBJECTIVES: dict[str, Callable] = {"causal": lambda windows, data, seed: windows, "mlm": _mlm, "denoise": _denoise}


def make_sampler(kind: str, data: TokenSplit, model: nn.Module, block_size: int, batch_size: int, seed: int):
    """The resumable training-batch sampler for `model`: `kind` windows (random | sequential),
    turned into the batches of the model's objective."""
    if kind not in SAMPLERS:
        raise LmlabError(f"unknown data.sampler '{kind}' ({' | '.join(SAMPLERS)})")
    objective = getattr(model, "objective", "causal")
    if objective not in OBJECTIVES:
        raise LmlabError(f"no batch sampler for the objective '{objective}' ({' | '.join(OBJECTIVES)})")
    return OBJECTIVES[objective](SAMPLERS[kind](data, block_size, batch_size, seed=seed), data, seed)
