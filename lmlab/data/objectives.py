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

# objective -> whether its (source, target) pair batches are masked (lmlab/data/seq2seq.py): an
# encoder-decoder pre-trained by denoising fine-tunes on plain pairs, a conditional masked LM on masked ones
PAIR_OBJECTIVES: dict[str, bool] = {"denoise": False, "cmlm": True}


def _pairs(path: str, data: TokenSplit, model: nn.Module, block_size: int, batch_size: int, seed: int):
    from lmlab.data.seq2seq import PairBatches, PairConfig, encode_pairs, read_pairs, split_pairs

    objective = getattr(model, "objective", "causal")
    if objective not in PAIR_OBJECTIVES:
        raise LmlabError(f"data.seq2seq needs an encoder-decoder (e.g. --model bart-tiny), "
                         f"not '{model.config.family}'")
    tok = _tokenizer_with_mask(data)
    cfg = PairConfig(pad_id=tok.pad_id, eos_id=tok.eos_id, mask_id=tok.mask_id, block_size=block_size,
                     masked=PAIR_OBJECTIVES[objective])
    pairs = encode_pairs(tok, split_pairs(read_pairs(path), data.split), cfg)
    return PairBatches(pairs, cfg, batch_size, seed=seed)


def _chats(kind: str, data: TokenSplit, model: nn.Module, block_size: int, batch_size: int, seed: int):
    from lmlab.data.chat import PackedChats

    if getattr(model, "objective", "causal") != "causal" or not hasattr(model, "make_kv_cache"):
        raise LmlabError(f"chat data (SFT) trains a decoder-only model (gpt, llama, ...), not "
                         f"'{model.config.family}'")
    return PackedChats(data, block_size, batch_size, seed=seed, shuffle=kind == "random")


# objectives that read images (lmlab/data/images.py): the prepared directory's task each needs
IMAGE_OBJECTIVES = {"classify": "classify", "caption": "caption"}


def _images(data, model: nn.Module, block_size: int, batch_size: int, seed: int, augment: int):
    from lmlab.data.images import ImageBatches

    objective = getattr(model, "objective", "causal")
    if not getattr(data, "is_images", False) or objective not in IMAGE_OBJECTIVES:
        what = "images" if getattr(data, "is_images", False) else "text"
        raise LmlabError(f"{data.dir} holds {what}; '{model.config.family}' models (objective '{objective}') "
                         "do not train on it")
    if data.task != IMAGE_OBJECTIVES[objective]:
        raise LmlabError(f"{data.dir} is prepared for '{data.task}', not for a '{objective}' model")
    eos = mask = 0
    if data.task == "caption":
        from lmlab.tokenizers import load_tokenizer

        tok = load_tokenizer(data.dir)
        eos, mask = tok.eos_id, tok.mask_id
        if data.meta["max_tokens"] > block_size:
            raise LmlabError(f"captions of up to {data.meta['max_tokens']} tokens exceed block_size {block_size}")
    return ImageBatches(data, batch_size, seed=seed, augment=augment, eos_id=eos, mask_id=mask)


def _labelled_text(data, model: nn.Module, block_size: int, batch_size: int, seed: int):
    from lmlab.data.classify import TASK, TextClassBatches

    objective = getattr(model, "objective", "causal")
    if getattr(data, "task", None) != TASK:
        raise LmlabError(f"a text classifier trains on labelled texts (lmlab prepare LABELLED.jsonl --format "
                         f"classify), not on {data.dir}")
    if objective != TASK:
        raise LmlabError(f"{data.dir} holds labelled texts; '{model.config.family}' models do not classify text "
                         "(fine-tune an encoder: lmlab train --init BERT_RUN --data DIR)")
    return TextClassBatches(data, batch_size, seed=seed, max_len=block_size)


def make_sampler(kind: str, data: TokenSplit, model: nn.Module, block_size: int, batch_size: int, seed: int,
                 pairs: str = "", augment: int = 0):
    """The resumable training-batch sampler for `model`: `kind` windows (random | sequential),
    turned into the batches of the model's objective; or, given a `pairs` JSONL file (data.seq2seq),
    batches of its (source, target) pairs, tokenized with the data directory's tokenizer; given chat
    data (`lmlab prepare --format chat`), packed conversations with their loss masks (SFT); for
    labelled texts (`--format classify`), padded batches of texts and labels; or, for a prepared image
    directory, batches of images (`augment`: random shifts of up to that many pixels)."""
    if getattr(data, "task", None) == "classify_text" or getattr(model, "objective", "") == "classify_text":
        return _labelled_text(data, model, block_size, batch_size, seed)
    if getattr(data, "is_images", False) or getattr(model, "objective", "causal") in IMAGE_OBJECTIVES:
        return _images(data, model, block_size, batch_size, seed, augment)
    if pairs:
        return _pairs(pairs, data, model, block_size, batch_size, seed)
    if kind not in SAMPLERS:
        raise LmlabError(f"unknown data.sampler '{kind}' ({' | '.join(SAMPLERS)})")
    if "chat" in data.meta:
        return _chats(kind, data, model, block_size, batch_size, seed)
    objective = getattr(model, "objective", "causal")
    if objective == "cmlm":
        raise LmlabError("a conditional masked LM trains on (source, target) pairs: set data.seq2seq=PAIRS.jsonl")
    if objective not in OBJECTIVES:
        raise LmlabError(f"no batch sampler for the objective '{objective}' ({' | '.join(OBJECTIVES)})")
    return OBJECTIVES[objective](SAMPLERS[kind](data, block_size, batch_size, seed=seed), data, seed)
