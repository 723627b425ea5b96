"""Sentences as integer arrays and n-gram counting for the n-gram LM, with sorted integer arrays (no dicts).

Vocabulary ids follow KenLM's `lmplz`: `<unk>`=0, `<s>`=1, `</s>`=2, then words in order of first
appearance. Every sentence becomes `<s> w1 .. wm </s>` in one flat stream; an n-gram never crosses
a sentence, and `<s>` only ever opens one (lmplz pads with order-1 `<s>` and then collapses the
n-grams with `<s>` past position 0, which leaves exactly this set).

Order k's n-grams are numbered by sorting the keys `id(w1..w_{k-1}) * V + w_k` over all stream
positions (`np.unique`), so ids are in lexicographic order, an n-gram's context id is `key // V`,
and each order's table is one sorted uint64 array that a query searches with `np.searchsorted`.
This is the prefix-tree numbering of Heafield's trie data structure, built with sorts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lmlab.errors import LmlabError

UNK, BOS, EOS = 0, 1, 2
SPECIAL_WORDS = ("<unk>", "<s>", "</s>")
_NONE = np.iinfo(np.uint64).max  # key of positions that hold no n-gram of the current order


@dataclass
class Sentences:
    """Sentences as one stream: `tokens[i]` (internal ids) and `span[i]`, the number of tokens from
    the sentence's first token through i, capped at 255 (only compared with orders)."""

    tokens: np.ndarray  # int32
    span: np.ndarray    # uint8
    vocab: list[str]    # internal id -> word
    skipped: int = 0    # <s> </s> <unk> found inside sentences and dropped (lmplz --skip_symbols)


@dataclass
class OrderCounts:
    keys: np.ndarray               # uint64, sorted; order 1: word ids 0..V-1
    count: np.ndarray              # raw counts (int32 where they fit)
    suffix: np.ndarray | None      # order > 1: id of w2..wk in the order below
    bos_start: np.ndarray          # bool: the n-gram starts with <s>


def _spans(starts_mask: np.ndarray) -> np.ndarray:
    pos = np.arange(len(starts_mask), dtype=np.int64)
    first = np.maximum.accumulate(np.where(starts_mask, pos, 0))
    return np.minimum(pos - first + 1, 255).astype(np.uint8)


def stream_from_sentences(sents: list[np.ndarray], *, bos: bool = True,
                          eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Join sentences of internal ids into (tokens, span), adding `<s>` / `</s>` as asked."""
    lens = np.fromiter((len(s) for s in sents), dtype=np.int64, count=len(sents)) + bos + eos
    if len(sents) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    tokens = np.empty(int(lens.sum()), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    body = np.concatenate([np.asarray(s, dtype=np.int32) for s in sents])
    mask = np.ones(len(tokens), dtype=bool)
    if bos:
        tokens[starts] = BOS
        mask[starts] = False
    if eos:
        tokens[starts + lens - 1] = EOS
        mask[starts + lens - 1] = False
    tokens[mask] = body
    is_start = np.zeros(len(tokens), dtype=bool)
    is_start[starts] = True
    return tokens, _spans(is_start)


def corpus_from_text(lines: Iterable[str]) -> Sentences:
    """Whitespace-split lines, one sentence each (lmplz's input format)."""
    index = {w: i for i, w in enumerate(SPECIAL_WORDS)}
    vocab = list(SPECIAL_WORDS)
    sents, skipped = [], 0
    for line in lines:
        ids = []
        for w in line.split():
            i = index.get(w)
            if i is None:
                i = index[w] = len(vocab)
                vocab.append(w)
            elif i < 3:  # <s> </s> <unk> as words: skipped and counted (lmplz --skip_symbols)
                skipped += 1
                continue
            ids.append(i)
        sents.append(np.asarray(ids, dtype=np.int32))
    tokens, span = stream_from_sentences(sents)
    return Sentences(tokens, span, vocab, skipped)


def corpus_from_ids(ids: np.ndarray, itos: Sequence[str], eos_id: int) -> tuple[Sentences, np.ndarray]:
    """A token-id stream whose sentences end with `eos_id` (a word tokenizer's output) -> corpus, and
    the map from the caller's ids to internal ids (`<unk>` for words never seen in training).

    Other ids spelled `<s>`, `</s>` or `<unk>` are dropped and counted in `Sentences.skipped` (lmplz --skip_symbols);
    to count a tokenizer's `<unk>` as an ordinary word (the PTB convention), rename it in `itos`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise LmlabError("token ids must be a 1-D integer array")
    n_in = len(itos)
    if len(ids) and (ids.min() < 0 or ids.max() >= n_in):
        raise LmlabError(f"token id out of range for a vocabulary of {n_in}")
    special = {w: i for i, w in enumerate(SPECIAL_WORDS)}
    is_eos = ids == eos_id
    drop = np.zeros(n_in, dtype=bool)
    for ext, w in enumerate(itos):
        if w in special and ext != eos_id:
            drop[ext] = True
    keep = ~drop[ids] | is_eos
    skipped = int(len(ids) - keep.sum())
    ids = ids[keep]
    is_eos = is_eos[keep]
    # internal ids in order of first appearance, as lmplz numbers its vocabulary
    words = ids[~is_eos]
    uniq, first = np.unique(words, return_index=True)
    order = uniq[np.argsort(first, kind="stable")]
    input_map = np.zeros(n_in, dtype=np.int32)  # unseen -> <unk>
    input_map[order] = np.arange(3, 3 + len(order), dtype=np.int32)
    input_map[eos_id] = EOS
    for ext, w in enumerate(itos):
        if w in special and ext != eos_id and input_map[ext] == 0:
            input_map[ext] = special[w]
    vocab = list(SPECIAL_WORDS) + [itos[i] for i in order]
    internal = input_map[ids]
    if len(internal) and internal[-1] != EOS:  # a last sentence without its </s>
        internal = np.append(internal, EOS)
    tokens, span, _ = open_sentences(internal)
    return Sentences(tokens, span, vocab, skipped), input_map


def open_sentences(internal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Put `<s>` before every sentence of a stream of internal ids whose sentences end with `</s>`
    (the last may lack it): tokens, span, and the mask of the inserted `<s>`."""
    if not len(internal):
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, bool)
    starts = np.flatnonzero(np.concatenate([[True], internal[:-1] == EOS]))
    tokens = np.insert(internal.astype(np.int32), starts, BOS)
    is_start = np.zeros(len(tokens), dtype=bool)
    is_start[starts + np.arange(len(starts))] = True
    return tokens, _spans(is_start), is_start


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 - 1 else np.int64


def _number(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique keys, the id of each position's key and the count of each key (np.unique
    with return_inverse and return_counts, with 32-bit ids where they fit to save memory)."""
    perm = np.argsort(keys, kind="stable")
    sorted_keys = keys[perm]
    new = np.empty(len(keys), dtype=bool)
    new[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    uniq = sorted_keys[new]
    del sorted_keys
    dtype = _index_dtype(len(uniq))
    inverse = np.empty(len(keys), dtype=dtype)
    inverse[perm] = np.cumsum(new, dtype=dtype) - 1
    del perm
    count = np.diff(np.append(np.flatnonzero(new), len(keys))).astype(_index_dtype(len(keys)))
    return uniq, inverse, count


def count_ngrams(corpus: Sentences, order: int, *, track: int | None = None
                 ) -> tuple[list[OrderCounts], list[int]]:
    """Counts of every order 1..`order`; with `track` (a stream position), also the id at each order
    of the n-gram ending there (-1 where it would cross the sentence start)."""
    tok, span = corpus.tokens, corpus.span
    V = len(corpus.vocab)
    uni_count = np.bincount(tok, minlength=V).astype(_index_dtype(len(tok)))
    bos_uni = np.zeros(V, dtype=bool)
    bos_uni[BOS] = True
    tables = [OrderCounts(np.arange(V, dtype=np.uint64), uni_count, None, bos_uni)]
    tracked = [int(tok[track])] if track is not None else []
    prev_ids = tok
    for k in range(2, order + 1):
        n_prev = len(tables[-1].count)
        if n_prev * V >= 2**63:
            raise LmlabError(f"too many {k - 1}-grams ({n_prev}) for 64-bit keys with a vocabulary of {V}")
        valid = span >= k
        keys = np.empty(len(tok), dtype=np.uint64)  # built in place: no full-length temporaries
        keys[0] = 0
        keys[1:] = prev_ids[:-1]
        keys *= np.uint64(V)
        np.add(keys, tok, out=keys, dtype=np.uint64, casting="unsafe")  # uint64 arithmetic, not float
        keys[~valid] = _NONE
        uniq, ids, count = _number(keys)
        del keys
        has_none = len(uniq) and uniq[-1] == _NONE
        n = len(uniq) - int(has_none)
        suffix = np.zeros(n + 1, dtype=prev_ids.dtype)
        suffix[ids] = prev_ids  # the (k-1)-gram ending at the same position is w2..wk
        bos_start = np.zeros(n + 1, dtype=bool)
        bos_start[ids] = span == k
        tables.append(OrderCounts(uniq[:n], count[:n], suffix[:n], bos_start[:n]))
        ids[~valid] = -1
        if track is not None:
            tracked.append(int(ids[track]))
        prev_ids = ids
    return tables, tracked


def kenlm_last_position(corpus: Sentences, order: int) -> int:
    """The stream position of the n-gram that sorts last in lmplz's suffix order (last word first,
    `<s>` padding before the sentence start). lmplz's AdjustCounts feeds that n-gram's lower-order
    suffixes into the counts-of-counts with their raw rather than adjusted counts (adjust_counts.cc,
    the final flush uses `actual_counts`); ngram_kn reproduces that to match lmplz exactly."""
    tok, span = corpus.tokens, corpus.span
    cand = np.flatnonzero(tok == tok.max())  # the largest id sorts last (never <s> in a real corpus)
    for j in range(1, order):
        if len(cand) <= 1:
            break
        back = cand - j
        vals = np.where(span[cand] > j, tok[np.maximum(back, 0)], BOS)
        cand = cand[vals == vals.max()]
    return int(cand[0]) if len(cand) else -1
