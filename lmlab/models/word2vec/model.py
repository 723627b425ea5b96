"""word2vec (Mikolov et al. 2013a, 2013b): skip-gram and CBOW word vectors by negative sampling.

The pieces follow the original C tool, with gensim's `Word2Vec` defaults so that runs can be compared
one to one:
  * vocabulary: words seen at least `min_count` times, most frequent first (ties: first seen);
  * subsampling of frequent words: word w with corpus count f is kept with probability
    (sqrt(f / (s * T)) + 1) * (s * T) / f, capped at 1 (s = `sample`, T = retained words), the C
    tool's formula (not the paper's 1 - sqrt(t/f));
  * negative words drawn from the unigram distribution raised to `ns_exponent` = 0.75 (2013b, sec. 2.2);
  * a window of random size 1..`window` per centre word;
  * learning rate falling linearly from `alpha` to `min_alpha` over all epochs.
The training loop itself is a numba kernel (word2vec_kernel.py), parallel over `workers` threads.

Text is tokenised by `tokenize`: lower-cased, split on whitespace, punctuation stripped from both
ends of each token ("Beginning," -> "beginning", "os.path" stays whole); a sentence is a line of a
text file or a document of a JSONL/built-in corpus, cut into pieces of at most 10,000 words (gensim's
limit per sentence).
"""

from __future__ import annotations

import string
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.word2vec.keyed_vectors import KeyedVectors

MAX_SENTENCE = 10_000      # gensim's MAX_WORDS_IN_BATCH: longer sentences are cut
CHUNK_WORDS = 10_000       # words per parallel work item (the C tool re-reads alpha every 10k words)
_PUNCT = string.punctuation + "“”‘’«»—–…"


@dataclass(kw_only=True)
class Word2VecConfig:
    vector_size: int = 100
    sg: int = 0                 # 1: skip-gram; 0: CBOW
    window: int = 5             # the largest distance between the centre word and a context word
    min_count: int = 5          # rarer words are left out of the vocabulary
    sample: float = 1e-3        # subsampling threshold s (0 disables)
    negative: int = 5           # negative words per positive one
    ns_exponent: float = 0.75   # unigram^0.75 noise distribution
    cbow_mean: int = 1          # CBOW: 1 averages the context vectors, 0 sums them
    alpha: float = 0.025        # initial learning rate
    min_alpha: float = 0.0001   # final learning rate
    epochs: int = 5
    seed: int = 1
    workers: int = 3            # threads; one worker gives reproducible vectors

    def validate(self) -> None:
        for name in ("vector_size", "window", "min_count", "epochs", "workers"):
            if getattr(self, name) < 1:
                raise LmlabError(f"word2vec: {name} must be >= 1, got {getattr(self, name)}")
        if self.negative < 1:
            raise LmlabError("word2vec: negative must be >= 1 (only negative sampling is implemented)")
        if self.sg not in (0, 1) or self.cbow_mean not in (0, 1):
            raise LmlabError("word2vec: sg and cbow_mean must be 0 or 1")
        if not (self.sample >= 0 and self.alpha > 0 and 0 <= self.min_alpha <= self.alpha):
            raise LmlabError("word2vec: need sample >= 0 and 0 <= min_alpha <= alpha, alpha > 0")


def tokenize(text: str) -> list[str]:
    """Lower-case, split on whitespace, strip punctuation from both ends; empty tokens are dropped."""
    out = []
    for tok in text.lower().split():
        tok = tok.strip(_PUNCT)
        if tok:
            out.append(tok)
    return out


@dataclass
class Vocab:
    words: list[str]
    counts: np.ndarray  # int64, descending

    @classmethod
    def build(cls, sentences: Iterable[list[str]], min_count: int) -> Vocab:
        counts: dict[str, int] = {}
        for sent in sentences:
            for w in sent:
                counts[w] = counts.get(w, 0) + 1
        # dicts keep first-seen order and sorted() is stable: ties stay in corpus order, as in gensim
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=counts.__getitem__, reverse=True)
        if not kept:
            raise LmlabError(f"word2vec: no word occurs min_count={min_count} times "
                             f"({len(counts)} distinct words in the corpus); lower --min_count")
        return cls(kept, np.array([counts[w] for w in kept], dtype=np.int64))

    def keep_probabilities(self, sample: float) -> np.ndarray:
        """The C tool's keep probability per word, as an integer threshold out of 2^32."""
        if sample <= 0:
            return np.full(len(self.words), 2**32, dtype=np.int64)
        f = self.counts.astype(np.float64)
        threshold = sample * f.sum()
        p = np.minimum(1.0, (np.sqrt(f / threshold) + 1) * threshold / f)
        return np.round(p * 2**32).astype(np.int64)

    def noise_cdf(self, exponent: float) -> np.ndarray:
        """Cumulative unigram^exponent distribution for drawing negative words."""
        w = self.counts.astype(np.float64) ** exponent
        cdf = np.cumsum(w) / w.sum()
        cdf[-1] = 1.0
        return cdf


@dataclass
class TrainStats:
    raw_words: int        # words in the corpus x epochs (what words/s is measured on)
    seconds: float

    @property
    def words_per_second(self) -> float:
        return self.raw_words / max(self.seconds, 1e-9)


class Word2Vec:
    """`Word2Vec(config).fit(sentences)`; the trained vectors are `.wv`, a KeyedVectors."""

    def __init__(self, config: Word2VecConfig | None = None):
        self.config = config or Word2VecConfig()
        self.config.validate()
        self.vocab: Vocab | None = None
        self.wv: KeyedVectors | None = None
        self.syn1neg: np.ndarray | None = None

    def build_vocab(self, sentences: list[list[str]]) -> None:
        cfg = self.config
        self.vocab = Vocab.build(sentences, cfg.min_count)
        n, dim = len(self.vocab.words), cfg.vector_size
        rng = np.random.default_rng(cfg.seed)
        # input vectors uniform in [-1, 1) / dim as gensim draws them (the C tool: [-0.5, 0.5) / dim),
        # output vectors zero
        vectors = ((rng.random((n, dim), dtype=np.float32) * 2 - 1) / dim).astype(np.float32)
        self.wv = KeyedVectors(self.vocab.words, vectors, counts=self.vocab.counts)
        self.syn1neg = np.zeros((n, dim), dtype=np.float32)

    def encode(self, sentences: list[list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, sentence starts, raw words): out-of-vocabulary words are dropped, as gensim does."""
        index = self.wv.key_to_index
        ids: list[int] = []
        starts = [0]
        raw = 0
        for sent in sentences:
            raw += len(sent)
            ids += [i for i in map(index.get, sent) if i is not None]
            if len(ids) > starts[-1]:
                starts.append(len(ids))
        return np.array(ids, dtype=np.int32), np.array(starts, dtype=np.int64), raw

    def train(self, sentences: list[list[str]]) -> TrainStats:
        from numba import get_num_threads, set_num_threads

        from lmlab.models.word2vec.kernel import train_epochs

        if self.wv is None:
            raise LmlabError("word2vec: build_vocab before train")
        cfg = self.config
        t0 = time.perf_counter()
        ids, starts, raw = self.encode(sentences)
        if len(ids) == 0:
            raise LmlabError("word2vec: no in-vocabulary words to train on")
        # chunk boundaries: the first sentence starting at or after each multiple of CHUNK_WORDS
        n_sent = len(starts) - 1
        chunk_starts = np.unique(np.searchsorted(starts[:-1], np.arange(0, starts[-1], CHUNK_WORDS)))
        chunk_starts = np.append(chunk_starts[chunk_starts < n_sent], n_sent).astype(np.int64)
        chunk_words = starts[chunk_starts[:-1]]
        threads, workers = get_num_threads(), min(cfg.workers, _max_threads())
        set_num_threads(workers)
        try:
            train_epochs(self.wv.vectors, self.syn1neg, ids, starts, chunk_starts, chunk_words,
                         self.vocab.keep_probabilities(cfg.sample), self.vocab.noise_cdf(cfg.ns_exponent),
                         cfg.sg, cfg.cbow_mean, cfg.window, cfg.negative, cfg.alpha, cfg.min_alpha, cfg.epochs,
                         cfg.seed, workers)
        finally:
            set_num_threads(threads)
        self.wv.clear_norms()
        return TrainStats(raw * cfg.epochs, time.perf_counter() - t0)

    def fit(self, sentences: list[list[str]]) -> TrainStats:
        self.build_vocab(sentences)
        return self.train(sentences)


def _max_threads() -> int:
    from numba import config

    return config.NUMBA_NUM_THREADS

