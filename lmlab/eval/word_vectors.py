"""Intrinsic evaluation of word vectors, on the files gensim's wheel ships (gensim/test/test_data/):

  * analogies, `questions-words.txt` (Mikolov et al. 2013a): ": section" lines, then "a b c d" with
    a : b :: c : d. The answer is the word nearest to b - a + c (3CosAdd, the query words left out).
    As gensim's `evaluate_word_analogies`: case-insensitive, only the `restrict_vocab` most frequent
    words are candidates, and questions with a word outside them are skipped, so accuracy is over
    covered questions;
  * word pairs, `wordsim353.tsv` (Finkelstein et al. 2002): "w1<TAB>w2<TAB>score", '#' comments;
    Spearman (and Pearson) correlation of cosine similarity with the human scores over covered pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.word2vec.keyed_vectors import KeyedVectors


def gensim_test_file(name: str) -> Path | None:
    """Path of `questions-words.txt` / `wordsim353.tsv` inside an installed gensim, if there is one."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    return path if path.is_file() else None


def _ok_vocab(kv: KeyedVectors, restrict_vocab: int) -> dict[str, int]:
    """Upper-cased word -> index among the first `restrict_vocab` words; the most frequent spelling
    wins when two differ only in case."""
    out: dict[str, int] = {}
    for i, w in enumerate(kv.index_to_key[:restrict_vocab]):
        out.setdefault(w.upper(), i)
    return out


def _lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such evaluation file: {path}")
    return path.read_text(encoding="utf-8").splitlines()


@dataclass
class AnalogyResult:
    sections: list[dict] = field(default_factory=list)  # {"section", "correct", "covered", "questions"}
    correct: int = 0
    covered: int = 0
    questions: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.covered if self.covered else float("nan")

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "covered": self.covered,
                "questions": self.questions, "sections": self.sections}


def evaluate_analogies(kv: KeyedVectors, path: str | os.PathLike, restrict_vocab: int = 300_000,
                       batch: int = 128) -> AnalogyResult:
    ok = _ok_vocab(kv, restrict_vocab)
    sections: list[tuple[str, list[tuple[int, int, int, int]], int]] = []
    for n, line in enumerate(_lines(path), 1):
        if line.startswith(":"):
            sections.append((line[1:].strip(), [], 0))
            continue
        if not line.strip():
            continue
        words = line.upper().split()
        if len(words) != 4 or not sections:
            raise LmlabError(f"{path}:{n}: expected ': section' or four words, found {line!r}")
        name, qs, total = sections[-1]
        sections[-1] = (name, qs, total + 1)
        if all(w in ok for w in words):
            qs.append(tuple(ok[w] for w in words))
    normed = kv.normed[:restrict_vocab]
    result = AnalogyResult()
    for name, qs, total in sections:
        correct = 0
        for lo in range(0, len(qs), batch):
            q = np.array(qs[lo:lo + batch])
            a, b, c, d = q.T
            query = normed[b] - normed[a] + normed[c]
            query /= np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
            sims = query @ normed.T
            rows = np.arange(len(q))
            for col in (a, b, c):
                sims[rows, col] = -np.inf
            correct += int((sims.argmax(axis=1) == d).sum())
        result.sections.append({"section": name, "correct": correct, "covered": len(qs), "questions": total})
        result.correct += correct
        result.covered += len(qs)
        result.questions += total
    return result


@dataclass
class PairsResult:
    spearman: float
    pearson: float
    covered: int
    pairs: int

    def as_dict(self) -> dict:
        return {"spearman": self.spearman, "pearson": self.pearson, "covered": self.covered, "pairs": self.pairs}


def evaluate_word_pairs(kv: KeyedVectors, path: str | os.PathLike, restrict_vocab: int = 300_000,
                        delimiter: str = "\t") -> PairsResult:
    from scipy import stats

    ok = _ok_vocab(kv, restrict_vocab)
    gold, model, pairs = [], [], 0
    for line in _lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.upper().split(delimiter)
        try:
            a, b, score = parts[0].strip(), parts[1].strip(), float(parts[2])
        except (IndexError, ValueError):
            continue  # a header or malformed line, skipped as gensim does
        pairs += 1
        if a in ok and b in ok:
            gold.append(score)
            model.append(float(kv.normed[ok[a]] @ kv.normed[ok[b]]))
    if len(gold) < 2:
        raise LmlabError(f"{path}: only {len(gold)} of {pairs} word pairs are in the vocabulary")
    return PairsResult(float(stats.spearmanr(gold, model)[0]), float(stats.pearsonr(gold, model)[0]),
                       len(gold), pairs)
