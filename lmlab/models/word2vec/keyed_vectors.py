"""Word vectors with names: lookup, cosine similarity and nearest neighbours.

The API mirrors gensim's `KeyedVectors` (index_to_key, key_to_index, vectors, most_similar,
similarity) so that code and habits carry over; evaluation on analogy and word-pair files is in
lmlab/eval/word_vectors.py, the word2vec file formats in lmlab/io/word2vec.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmlab.errors import LmlabError


class KeyedVectors:
    def __init__(self, keys: Sequence[str], vectors: np.ndarray, counts: np.ndarray | None = None):
        if vectors.ndim != 2 or len(keys) != vectors.shape[0]:
            raise LmlabError(f"KeyedVectors: {len(keys)} keys for a vectors array of shape {vectors.shape}")
        self.index_to_key = list(keys)
        self.key_to_index = {k: i for i, k in enumerate(self.index_to_key)}
        if len(self.key_to_index) != len(self.index_to_key):
            raise LmlabError("KeyedVectors: duplicate keys")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.counts = counts
        self._norms: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index_to_key)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_index

    @property
    def vector_size(self) -> int:
        return self.vectors.shape[1]

    def index(self, key: str) -> int:
        try:
            return self.key_to_index[key]
        except KeyError:
            raise LmlabError(f"'{key}' is not in the vocabulary ({len(self)} words)") from None

    def __getitem__(self, key: str) -> np.ndarray:
        return self.vectors[self.index(key)]

    def clear_norms(self) -> None:
        """Forget the cached unit vectors (call after the vectors change)."""
        self._norms = None

    @property
    def normed(self) -> np.ndarray:
        """Unit-length copies of the vectors (zero vectors stay zero)."""
        if self._norms is None:
            n = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._norms = self.vectors / np.maximum(n, 1e-12)
        return self._norms

    def similarity(self, a: str, b: str) -> float:
        return float(self.normed[self.index(a)] @ self.normed[self.index(b)])

    def most_similar(self, positive: str | Sequence[str] = (), negative: str | Sequence[str] = (),
                     topn: int = 10, restrict_vocab: int | None = None) -> list[tuple[str, float]]:
        """The `topn` words nearest by cosine to the mean of the positive unit vectors minus the
        negative ones (3CosAdd for analogies: king - man + woman), the query words left out; only
        the `restrict_vocab` most frequent words are candidates."""
        positive = [positive] if isinstance(positive, str) else list(positive)
        negative = [negative] if isinstance(negative, str) else list(negative)
        if not positive and not negative:
            raise LmlabError("most_similar needs at least one positive or negative word")
        idx = [self.index(w) for w in positive + negative]
        weights = np.array([1.0] * len(positive) + [-1.0] * len(negative), dtype=np.float32)
        query = weights @ self.normed[idx]
        query /= max(float(np.linalg.norm(query)), 1e-12)
        return self.nearest(query, topn, exclude=idx, restrict_vocab=restrict_vocab)

    def nearest(self, query: np.ndarray, topn: int = 10, exclude: Sequence[int] = (),
                restrict_vocab: int | None = None) -> list[tuple[str, float]]:
        cand = self.normed[:restrict_vocab] if restrict_vocab else self.normed
        sims = cand @ query
        sims[[i for i in exclude if i < len(sims)]] = -np.inf
        k = min(topn, len(sims) - len(exclude))
        if k <= 0:
            return []
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(self.index_to_key[i], float(sims[i])) for i in top]


def neighbour_overlap(a: KeyedVectors, b: KeyedVectors, words: int = 1000, topn: int = 10) -> float:
    """Mean fraction of shared top-`topn` neighbours, over the `words` most frequent words of `a` that
    `b` also has: how alike two embeddings of one corpus are, whatever their rotation."""
    common = [w for w in a.index_to_key[:words] if w in b]
    if not common:
        raise LmlabError("neighbour_overlap: the two vocabularies share none of the most frequent words")
    na, nb = _neighbour_sets(a, common, topn), _neighbour_sets(b, common, topn)
    return float(np.mean([len(x & y) / topn for x, y in zip(na, nb)]))


def _neighbour_sets(kv: KeyedVectors, words: list[str], topn: int) -> list[set[str]]:
    idx = np.array([kv.index(w) for w in words])
    sims = kv.normed[idx] @ kv.normed.T
    sims[np.arange(len(idx)), idx] = -np.inf
    top = np.argpartition(-sims, topn - 1, axis=1)[:, :topn]
    return [{kv.index_to_key[i] for i in row} for row in top]
