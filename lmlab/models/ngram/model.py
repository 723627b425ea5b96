"""Count-based n-gram language models over words or token ids, any order.

Smoothings: interpolated modified Kneser-Ney exactly as KenLM's `lmplz` estimates it (ngram_kn.py;
Chen & Goodman 1998, Heafield et al. 2013), and for teaching: maximum likelihood
n(w1..wk) / n(w1..wk-1), add-k (Laplace for k=1) and stupid backoff (Brants et al. 2007, alpha 0.4).

Conventions are KenLM's: a sentence is a line (or a run of ids closed by `</s>`), `<s>` is context
only, `</s>` is predicted, and scores are log10. Unknown words are `<unk>`, which Kneser-Ney gives
the interpolated unigram mass (`lmplz --interpolate_unigrams`). Everything is vectorised over sorted
integer arrays (ngram_count.py), so a 5-gram model of 100M tokens builds in a few GiB.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.ngram.count import (
    BOS,
    EOS,
    UNK,
    Sentences,
    corpus_from_ids,
    corpus_from_text,
    count_ngrams,
    kenlm_last_position,
    open_sentences,
    stream_from_sentences,
)
from lmlab.models.ngram.kn import BackoffTables, estimate
from lmlab.models.ngram.sample import next_logprobs, sample

Smoothing = Literal["kneser_ney", "mle", "add_k", "stupid_backoff"]


@dataclass(kw_only=True)
class NGramConfig(ModelConfig):
    family: str = "ngram"
    order: int = 3
    smoothing: Smoothing = "kneser_ney"
    add_k: float = 1.0            # add-k: the pseudo-count of every word in every context
    alpha: float = 0.4            # stupid backoff's constant (Brants et al. 2007)
    discount_fallback: bool = False  # lmplz --discount_fallback: fixed discounts where KN's fail
    fallback_discounts: tuple[float, ...] = (0.5, 1.0, 1.5)  # lmplz's defaults for D1, D2, D3+
    skip_symbols: bool = False    # lmplz --skip_symbols: <s> </s> <unk> inside text are whitespace


@dataclass
class Perplexity:
    """What KenLM's `query` reports: `</s>` counts as a token; OOVs are scored as `<unk>` in the
    first figure and left out (with their tokens) in the second."""

    tokens: int
    oovs: int
    log10_prob: float
    log10_prob_oov: float

    @property
    def perplexity(self) -> float:
        return 10.0 ** (-self.log10_prob / max(self.tokens, 1))

    @property
    def perplexity_excluding_oovs(self) -> float:
        return 10.0 ** (-(self.log10_prob - self.log10_prob_oov) / max(self.tokens - self.oovs, 1))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "oovs": self.oovs, "log10_prob": self.log10_prob,
                "perplexity": self.perplexity, "perplexity_excluding_oovs": self.perplexity_excluding_oovs}


class NGramModel:
    """A queryable n-gram model: per order, sorted keys `context_id * V + word` and either ARPA
    log10 prob/backoff arrays (Kneser-Ney, or a model read from ARPA) or raw counts (the rest)."""

    def __init__(self, config: NGramConfig, vocab: list[str], keys: list[np.ndarray], *,
                 tables: BackoffTables | None = None, counts: list[np.ndarray] | None = None,
                 input_map: np.ndarray | None = None):
        self.config, self.vocab, self.keys = config, vocab, keys
        self.tables, self.counts, self.input_map = tables, counts, input_map
        self.discounts: np.ndarray | None = None          # [order, 4]: 0, D1, D2, D3+
        self.counts_of_counts: np.ndarray | None = None   # [order, 5]: n0..n4 of adjusted counts
        self._index: dict[str, int] | None = None
        self.timings: dict[str, float] = {}               # seconds per build phase
        if counts is not None:  # context totals: n(w1..wk-1 .) per context id, per order
            self.totals = [np.array([counts[0].sum() - counts[0][BOS]], dtype=np.float64)]
            for k in range(1, len(counts)):
                ctx = (keys[k] // np.uint64(len(vocab))).astype(np.int64)
                self.totals.append(np.bincount(ctx, weights=counts[k], minlength=len(keys[k - 1])))

    # ---------------------------------------------------------------- building
    @classmethod
    def from_corpus(cls, corpus: Sentences, config: NGramConfig, input_map: np.ndarray | None = None) -> NGramModel:
        N = config.order
        if not 1 <= N <= 254:
            raise LmlabError(f"n-gram order must be between 1 and 254, got {N}")
        if config.smoothing not in typing.get_args(Smoothing):
            choices = ", ".join(typing.get_args(Smoothing))
            raise LmlabError(f"unknown smoothing '{config.smoothing}'; choose one of {choices}")
        if config.add_k <= 0 or not 0 < config.alpha <= 1:
            raise LmlabError(f"need add_k > 0 and 0 < alpha <= 1, got add_k={config.add_k}, alpha={config.alpha}")
        if corpus.skipped and not config.skip_symbols:
            raise LmlabError(f"the training text holds <s>, </s> or <unk> as words ({corpus.skipped} times), which "
                             "lmplz refuses too: rename them (PTB's <unk> is an ordinary word there) or set "
                             "skip_symbols=True to read them as whitespace (lmplz --skip_symbols)")
        if not (corpus.tokens > EOS).any():
            raise LmlabError("the training corpus is empty: no words to count")
        kn = config.smoothing == "kneser_ney"
        t0 = time.perf_counter()
        last = kenlm_last_position(corpus, N) if kn else None
        counted, last_ids = count_ngrams(corpus, N, track=last)
        keys = [t.keys for t in counted]
        t1 = time.perf_counter()
        if not kn:
            model = cls(config, corpus.vocab, keys, counts=[t.count for t in counted], input_map=input_map)
            model.timings = {"count_s": t1 - t0}
            return model
        fallback = tuple(config.fallback_discounts) if config.discount_fallback else None
        if fallback is not None and len(fallback) != 3:
            raise LmlabError(f"fallback_discounts needs three values (D1, D2, D3+), got {list(fallback)}")
        tables, D, n = estimate(counted, len(corpus.vocab), last_ids, fallback)
        model = cls(config, corpus.vocab, keys, tables=tables, input_map=input_map)
        model.discounts, model.counts_of_counts = D, n
        model.timings = {"count_s": t1 - t0, "estimate_s": time.perf_counter() - t1}
        return model

    @classmethod
    def from_text(cls, lines: Iterable[str], config: NGramConfig | None = None) -> NGramModel:
        """One sentence per line, words split on whitespace (lmplz's input)."""
        return cls.from_corpus(corpus_from_text(lines), config or NGramConfig())

    @classmethod
    def from_ids(cls, ids: np.ndarray | Sequence[int], config: NGramConfig | None = None, *,
                 itos: Sequence[str] | None = None, eos_id: int | None = None) -> NGramModel:
        """A token stream whose sentences end with `eos_id` (default: the id of `</s>` in `itos`),
        e.g. a word tokenizer's output. `itos` spells the ids for ARPA files and text queries
        (default: the ids' decimal strings). Other ids spelled `<s>`, `</s>`, `<unk>` are an error unless
        `skip_symbols` (as in lmplz); to count a tokenizer's `<unk>` as a word (PTB), rename it in `itos`."""
        ids = np.asarray(ids)
        if itos is None:
            if eos_id is None:
                raise LmlabError("give eos_id (the id that closes each sentence) or itos")
            itos = [str(i) for i in range(max(int(ids.max(initial=0)), eos_id) + 1)]
            itos[eos_id] = "</s>"
        eos_id = _eos_of(itos, eos_id)
        corpus, input_map = corpus_from_ids(ids, itos, eos_id)
        return cls.from_corpus(corpus, config or NGramConfig(), input_map)

    @classmethod
    def from_sentences(cls, sentences: Iterable[Sequence[int]], config: NGramConfig | None = None, *,
                       itos: Sequence[str] | None = None, eos_id: int | None = None) -> NGramModel:
        """Sentences of token ids without `</s>` (one is appended to each)."""
        eos = _eos_of(itos, eos_id) if itos is not None else eos_id
        if eos is None:
            raise LmlabError("give eos_id (the id that closes each sentence) or itos")
        ids = [np.append(np.asarray(s, dtype=np.int64), eos) for s in sentences]
        return cls.from_ids(np.concatenate(ids) if ids else np.zeros(0, np.int64), config, itos=itos, eos_id=eos)

    @classmethod
    def from_tokenizer(cls, tokenizer, texts: Iterable[str], config: NGramConfig | None = None) -> NGramModel:
        """Texts encoded by an lmlab tokenizer (a word tokenizer closes every line with `</s>`)."""
        ids = [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]
        itos = getattr(tokenizer, "itos", None) or [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        return cls.from_ids(np.concatenate(ids) if ids else np.zeros(0, np.int64), config, itos=itos,
                            eos_id=tokenizer.eos_id)

    # ---------------------------------------------------------------- vocabulary
    @property
    def order(self) -> int:
        return len(self.keys)

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {w: i for i, w in enumerate(self.vocab)}
        return self._index

    def use_ids(self, itos: Sequence[str]) -> None:
        """Accept the caller's token ids spelled by `itos` from now on (e.g. for a model read from
        ARPA, to score a tokenizer's ids); words not in the model become `<unk>`."""
        self.input_map = np.array([self.index.get(w, UNK) for w in itos], dtype=np.int32)

    def encode(self, sentence: str | Sequence[int]) -> np.ndarray:
        """Words (a string) or the caller's token ids (models built with `from_ids`) -> internal ids."""
        if isinstance(sentence, str):
            get = self.index.get
            return np.fromiter((get(w, UNK) for w in sentence.split()), dtype=np.int32)
        if self.input_map is None:
            raise LmlabError("this model was not built from token ids: score strings of words, or call use_ids(itos)")
        ids = np.asarray(sentence, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self.input_map))
        return np.where(ok, self.input_map[np.clip(ids, 0, len(self.input_map) - 1)], UNK).astype(np.int32)

    # ---------------------------------------------------------------- lookups
    def _find(self, k: int, ctx: np.ndarray, word: np.ndarray) -> np.ndarray:
        """Id of the order-(k+1) n-gram (context id, word), or -1."""
        keys = self.keys[k]
        if not len(keys):
            return np.full(len(ctx), -1, dtype=np.int64)
        key = ctx.astype(np.uint64) * np.uint64(len(self.vocab)) + word.astype(np.uint64)
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return np.where((ctx >= 0) & (keys[pos] == key), pos, -1)

    def _ids(self, tokens: np.ndarray, span: np.ndarray) -> list[np.ndarray]:
        """ids[k][i]: the id of the (k+1)-gram ending at position i, -1 if absent or if it would
        reach back past the sentence start."""
        ids = [tokens.astype(np.int64)]
        for k in range(1, self.order):
            ids.append(self._find(k, np.where(span > k, _shift(ids[-1]), -1), tokens))
        return ids

    def _score_stream(self, tokens: np.ndarray, span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log10 p of every position given its sentence's context, and the n-gram length used."""
        ids = self._ids(tokens, span)
        match = np.ones(len(tokens), dtype=np.int64)  # the longest n-gram in the model
        for k in range(1, self.order):
            match[ids[k] >= 0] = k + 1
        avail = np.minimum(span.astype(np.int64), self.order)  # the longest the context allows
        with np.errstate(divide="ignore"):
            if self.tables is not None:
                return self._backoff_scores(ids, span, match), match
            if self.config.smoothing == "stupid_backoff":
                return self._stupid_scores(ids, match, avail), match
            lp = self._fixed_order_scores(ids, avail)
            return lp, np.where(lp > -np.inf, avail, 0)

    def _backoff_scores(self, ids, span, match) -> np.ndarray:
        """ARPA semantics: p of the longest match, times the backoffs of the longer contexts."""
        t = self.tables
        lp = t.prob[0][ids[0]].astype(np.float64)
        for k in range(1, self.order):
            hit = ids[k] >= 0
            lp[hit] = t.prob[k][ids[k][hit]]
        for j in range(1, self.order):  # the context of length j: the j-gram ending one before
            ctx = _shift(ids[j - 1])
            use = (ctx >= 0) & (span > j) & (match <= j)
            lp[use] += t.backoff[j - 1][ctx[use]]
        return lp

    def _ratio(self, k: int, rows: np.ndarray) -> np.ndarray:
        """n(w1..wk+1) / n(w1..wk .) for order-(k+1) entries `rows`."""
        if k == 0:
            return self.counts[0][rows] / self.totals[0][0]
        ctx = (self.keys[k][rows] // np.uint64(len(self.vocab))).astype(np.int64)
        return self.counts[k][rows] / self.totals[k][ctx]

    def _stupid_scores(self, ids, match, avail) -> np.ndarray:
        """Brants et al. 2007: the relative frequency of the longest match, times alpha per step back."""
        lp = np.full(len(match), -np.inf)
        for k in range(self.order):
            hit = match == k + 1
            lp[hit] = np.log10(self._ratio(k, ids[k][hit]))
        return lp + (avail - match) * math.log10(self.config.alpha)

    def _fixed_order_scores(self, ids, avail) -> np.ndarray:
        """Maximum likelihood or add-k at the full order the context allows, no backing off."""
        lp = np.empty(len(avail))
        for k in range(self.order):
            at = avail == k + 1
            gid = ids[k][at]
            ctx = np.zeros(at.sum(), np.int64) if k == 0 else _shift(ids[k - 1])[at]
            total = np.where(ctx >= 0, self.totals[k][np.maximum(ctx, 0)], 0.0)
            num = np.where(gid >= 0, self.counts[k][np.maximum(gid, 0)], 0).astype(np.float64)
            if self.config.smoothing == "add_k":  # outcomes: every word but <s>
                a, V = self.config.add_k, len(self.vocab) - 1
                lp[at] = np.log10((num + a) / (total + a * V))
            else:
                lp[at] = np.where(total > 0, np.log10(num / np.maximum(total, 1)), -np.inf)
        return lp

    # ---------------------------------------------------------------- scoring
    def _stream(self, sentences: Sequence[str | Sequence[int]], bos: bool, eos: bool):
        sents = [self.encode(s) for s in sentences]
        tokens, span = stream_from_sentences(sents, bos=bos, eos=eos)
        target = ~((tokens == BOS) & (span == 1)) if bos else np.ones(len(tokens), dtype=bool)
        return sents, tokens, span, target

    def full_scores(self, sentence: str | Sequence[int], bos: bool = True,
                    eos: bool = True) -> list[tuple[float, int, bool]]:
        """(log10 prob, n-gram length used, is OOV) per word and `</s>`, like kenlm's Model.full_scores."""
        _, tokens, span, target = self._stream([sentence], bos, eos)
        lp, match = self._score_stream(tokens, span)
        return [(float(p), int(m), bool(w == UNK)) for p, m, w in zip(lp[target], match[target], tokens[target])]

    def score(self, sentence: str | Sequence[int], bos: bool = True, eos: bool = True) -> float:
        """log10 probability of a sentence including `</s>` (kenlm's Model.score)."""
        return float(self.score_batch([sentence], bos, eos)[0])

    def score_batch(self, sentences: Sequence[str | Sequence[int]], bos: bool = True, eos: bool = True) -> np.ndarray:
        sents, tokens, span, target = self._stream(sentences, bos, eos)
        lp, _ = self._score_stream(tokens, span)
        sent_of = np.repeat(np.arange(len(sents)), [len(s) + eos for s in sents])
        return np.bincount(sent_of, weights=lp[target], minlength=len(sents))

    def perplexity(self, sentences: Iterable[str | Sequence[int]], batch: int = 10000) -> Perplexity:
        """Perplexity over sentences, with and without OOVs, as KenLM's `query` reports it."""
        sentences = list(sentences)
        total, total_oov, tokens, oovs = 0.0, 0.0, 0, 0
        for lo in range(0, len(sentences), batch):
            _, tok, span, target = self._stream(sentences[lo:lo + batch], True, True)
            lp = self._score_stream(tok, span)[0][target]
            oov = tok[target] == UNK
            total, total_oov = total + lp.sum(), total_oov + lp[oov].sum()
            tokens, oovs = tokens + len(lp), oovs + int(oov.sum())
        return Perplexity(tokens, oovs, float(total), float(total_oov))

    def logprobs(self, token_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Natural-log probability of every token of an id stream whose sentences end with `</s>`
        (the caller's ids, as for `from_ids`), each sentence scored from `<s>`: lmlab's common
        `logprobs` contract, so eval's perplexity and bits per byte cover n-grams too."""
        tokens, span, is_bos = open_sentences(self.encode(np.asarray(token_ids, dtype=np.int64)))
        return self._score_stream(tokens, span)[0][~is_bos] * math.log(10.0)

    # ---------------------------------------------------------------- generation
    def next_logprobs(self, context: Sequence[int]) -> np.ndarray:
        """log10 p(w | context) for every internal word id w (stupid backoff: its unnormalised
        score); `context` is internal ids, starting with `<s>` at a sentence start."""
        return next_logprobs(self, context)

    def sample(self, n: int = 1, *, max_tokens: int = 50, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, prefix: str = "", seed: int | None = None) -> list[str]:
        """Sentences drawn word by word from `<s>` (plus `prefix`) until `</s>`; `<unk>` is never drawn."""
        return sample(self, n, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      prefix=prefix, seed=seed)


def _shift(a: np.ndarray) -> np.ndarray:
    """a[i - 1] at position i (-1 at the first)."""
    return np.concatenate([[-1], a[:-1]]).astype(np.int64)


def _eos_of(itos: Sequence[str], eos_id: int | None) -> int:
    if eos_id is not None:
        return eos_id
    try:
        return list(itos).index("</s>")
    except ValueError:
        raise LmlabError("the vocabulary has no </s>; pass eos_id") from None
