"""Estimating an n-gram model (its "training" is counting) from a text file or a prepared data directory.

A text file holds one sentence per line, as KenLM's lmplz reads it; a data directory contributes its
training split, sentences closed by the tokenizer's `</s>`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.ngram.model import NGramConfig, NGramModel

log = logging.getLogger(__name__)

# short CLI names -> NGramConfig.smoothing
SMOOTHINGS = {"kn": "kneser_ney", "mle": "mle", "addk": "add_k", "stupid": "stupid_backoff"}
# a tokenizer's <unk> counted as an ordinary word (the PTB convention) needs another spelling, since
# `<unk>` in an n-gram model is the model's own unknown-word entry
UNK_AS_WORD = "<unk_word>"


def smoothing_name(name: str) -> str:
    full = SMOOTHINGS.get(name, name)
    if full not in SMOOTHINGS.values():
        raise LmlabError(f"unknown smoothing '{name}'; choose one of {', '.join(SMOOTHINGS)}")
    return full


def data_dir_itos(tok) -> list[str]:
    """How a prepared data directory's token ids are spelled in an n-gram model: words for a word
    tokenizer (its `<unk>` renamed so that it counts as a word), decimal ids otherwise (subword
    pieces may hold whitespace, which ARPA cannot)."""
    if getattr(tok, "kind", "") == "word":
        itos = list(tok.itos)
        itos[tok.unk_id] = UNK_AS_WORD
    else:
        itos = [str(i) for i in range(tok.vocab_size)]
    itos[tok.eos_id] = "</s>"
    return itos


def build_model(source: str | Path, config: NGramConfig) -> NGramModel:
    """An n-gram model of a text file or of a prepared data directory's training split."""
    path = Path(source)
    t0 = time.perf_counter()
    if (path / "meta.json").is_file():
        from lmlab.data.stream import TokenSplit
        from lmlab.tokenizers import load_tokenizer

        tok = load_tokenizer(path)
        model = NGramModel.from_ids(TokenSplit(path, "train").tokens().astype(np.int64), config,
                                    itos=data_dir_itos(tok), eos_id=tok.eos_id)
    elif path.is_file():
        with open(path, encoding="utf-8") as f:
            model = NGramModel.from_text(f, config)
    else:
        raise LmlabError(f"{path} is neither a text file nor a prepared data directory (with meta.json)")
    sizes = ", ".join(f"{k + 1}-grams {len(keys):,}" for k, keys in enumerate(model.keys))
    log.info(f"{config.order}-gram {config.smoothing} model of {path}: vocabulary {len(model.vocab):,}; {sizes} "
        f"({time.perf_counter() - t0:.1f} s)")
    return model
