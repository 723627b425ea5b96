"""Tokenizers behind one protocol: char-level, word-level and byte-level BPE."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.tokenizers.base import ROLES, SpecialTokens, Tokenizer
from lmlab.tokenizers.bpe import BPETokenizer
from lmlab.tokenizers.vocab import CharTokenizer, WordTokenizer

KINDS = {"char": CharTokenizer, "word": WordTokenizer, "bpe": BPETokenizer}


def train_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int = 8192, min_count: int = 1) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts` (an iterable that is consumed once)."""
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size, min_count=max(min_count, 1))
    if kind in ("char", "word"):
        max_vocab = vocab_size if vocab_size and vocab_size > 0 else None
        return KINDS[kind].train(texts, min_count=min_count, max_vocab=max_vocab)
    raise LmlabError(f"unknown tokenizer kind '{kind}'. Choose one of: {', '.join(KINDS)}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory holding `tokenizer.json` (or from that file itself)."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise LmlabError(f"no tokenizer found at {p} (expected tokenizer.json)")
    text = file.read_text(encoding="utf-8")
    data = json.loads(text)
    kind = data.get("lmlab_tokenizer")
    if kind is None:
        return BPETokenizer.load(file.parent, text)
    if kind not in ("char", "word"):
        raise LmlabError(f"{file}: unknown lmlab tokenizer kind '{kind}'")
    return KINDS[kind].from_json(data)


def vocabulary(tok: Tokenizer) -> list[str]:
    """Every token's string, by id: what the rows of a model's embedding stand for."""
    if isinstance(tok, BPETokenizer):
        return [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    itos = getattr(tok, "itos", None)
    return list(itos) if itos is not None else [tok.decode([i]) for i in range(tok.vocab_size)]


__all__ = ["ROLES", "SpecialTokens", "Tokenizer", "CharTokenizer", "WordTokenizer", "BPETokenizer",
           "train_tokenizer", "load_tokenizer", "vocabulary"]
