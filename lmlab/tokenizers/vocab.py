"""Char- and word-level tokenizers: a vocabulary list plus a splitting rule.

Both are saved as a small `tokenizer.json` of lmlab's own (`{"lmlab_tokenizer": "char", ...}`);
byte-level BPE uses the Hugging Face format instead (see bpe.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from lmlab.tokenizers.base import ROLES, SpecialIdsMixin, SpecialTokens
from lmlab.utils.atomic import atomic_write_text


def _build_vocab(counts: Counter, specials: SpecialTokens, min_count: int, max_vocab: int | None) -> list[str]:
    reserved = specials.as_list()
    # Most frequent first; ties broken by the token itself so the vocabulary is deterministic.
    items = sorted(((t, c) for t, c in counts.items() if c >= min_count and t not in reserved),
                   key=lambda tc: (-tc[1], tc[0]))
    if max_vocab is not None:
        items = items[: max(0, max_vocab - len(reserved))]
    return reserved + [t for t, _ in items]


class VocabTokenizer(SpecialIdsMixin):
    kind = "vocab"

    def __init__(self, vocab: list[str], specials: SpecialTokens = SpecialTokens()):
        self.specials = specials
        self.itos = list(vocab)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate entries")

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    def save(self, directory: str) -> None:
        data = {"lmlab_tokenizer": self.kind, "specials": self.specials.as_dict(), "vocab": self.itos}
        data.update(self._extra_state())
        atomic_write_text(Path(directory) / "tokenizer.json", json.dumps(data, ensure_ascii=False))

    def _extra_state(self) -> dict:
        return {}

    @classmethod
    def from_json(cls, data: dict) -> VocabTokenizer:
        specials = SpecialTokens(**{r: data["specials"][r] for r in ROLES})
        extra = {k: v for k, v in data.items() if k not in ("lmlab_tokenizer", "specials", "vocab")}
        return cls(data["vocab"], specials, **extra)


class CharTokenizer(VocabTokenizer):
    """One token per Unicode character; characters unseen in training map to `<unk>`."""

    kind = "char"

    @classmethod
    def train(cls, texts: Iterable[str], *, min_count: int = 1, max_vocab: int | None = None,
              specials: SpecialTokens = SpecialTokens()) -> CharTokenizer:
        counts: Counter = Counter()
        for t in texts:
            counts.update(t)
        return cls(_build_vocab(counts, specials, min_count, max_vocab), specials)

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        get = self.stoi.get
        return [get(c, unk) for c in text]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        special = self.special_ids if skip_special else set()
        return "".join(self.itos[i] for i in ids if i not in special)


class WordTokenizer(VocabTokenizer):
    """Whitespace-separated words, with `</s>` closing every line (the PTB / KenLM convention).

    `min_count` and `max_vocab` decide which words are kept; the rest become `<unk>`.
    """

    kind = "word"

    def __init__(self, vocab: list[str], specials: SpecialTokens = SpecialTokens(), eos_per_line: bool = True):
        super().__init__(vocab, specials)
        self.eos_per_line = eos_per_line

    def _extra_state(self) -> dict:
        return {"eos_per_line": self.eos_per_line}

    @classmethod
    def train(cls, texts: Iterable[str], *, min_count: int = 1, max_vocab: int | None = None,
              specials: SpecialTokens = SpecialTokens(), eos_per_line: bool = True) -> WordTokenizer:
        counts: Counter = Counter()
        for t in texts:
            counts.update(t.split())
        return cls(_build_vocab(counts, specials, min_count, max_vocab), specials, eos_per_line)

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        get = self.stoi.get
        if not self.eos_per_line:
            return [get(w, unk) for w in text.split()]
        eos = self.eos_id
        out: list[int] = []
        for line in text.splitlines():
            words = line.split()
            if words:
                out.extend(get(w, unk) for w in words)
                out.append(eos)
        return out

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        eos = self.eos_id
        special = self.special_ids
        lines, cur = [], []
        for i in ids:
            if i == eos and self.eos_per_line:
                lines.append(" ".join(cur))
                cur = []
            elif skip_special and i in special:
                continue
            else:
                cur.append(self.itos[i])
        if cur:
            lines.append(" ".join(cur))
        return "\n".join(lines) + ("\n" if ids and ids[-1] == eos and self.eos_per_line else "")
