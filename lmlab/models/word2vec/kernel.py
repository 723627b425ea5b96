"""The word2vec training loop as a numba kernel: skip-gram and CBOW with negative sampling.

One call trains every epoch. Within an epoch the corpus is cut into chunks of whole sentences, which
`workers` threads (`prange`) train in parallel without locks, updating the shared matrices in place: "Hogwild"
(Recht et al. 2011), as the original tool's pthreads and gensim's worker threads do. Updates are
sparse, so collisions are rare and harmless.

Everything random comes from the original tool's linear congruential generator
(next = next * 25214903917 + 11), seeded per (epoch, chunk) so that the result does not depend on
which thread takes which chunk: one worker gives bit-identical vectors run after run.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Reciprocal of 2^32: maps a 32-bit random integer to [0, 1).
_INV_2_32 = 1.0 / 4294967296.0
# The original tool's sigmoid: a table of EXP_TABLE_SIZE values over logits in [-MAX_EXP, MAX_EXP),
# read at the bin's lower edge; beyond +-MAX_EXP the sigmoid is taken as exactly 1 or 0.
MAX_EXP = 6
EXP_TABLE_SIZE = 1000
_x = np.exp((np.arange(EXP_TABLE_SIZE) / EXP_TABLE_SIZE * 2 - 1) * MAX_EXP)
SIGMOID_TABLE = (_x / (_x + 1)).astype(np.float32)
_TABLE_SCALE = np.float32(EXP_TABLE_SIZE / MAX_EXP / 2)


@njit(inline="always")
def _next(state: np.int64) -> np.int64:
    return state * np.int64(25214903917) + np.int64(11)  # int64 arithmetic wraps, as unsigned C does


@njit(inline="always")
def _mix(x: np.int64) -> np.int64:
    """splitmix64's finaliser (Steele et al. 2014): distinct seeds for every (seed, epoch, chunk)."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.int64(z ^ (z >> np.uint64(31)))


@njit(inline="always")
def _rand32(state: np.int64) -> np.int64:
    return (state >> np.int64(16)) & np.int64(0xFFFFFFFF)  # the generator's better, high bits


@njit(inline="always")
def _sigmoid(x: np.float32) -> np.float32:
    if x >= MAX_EXP:
        return np.float32(1.0)
    if x <= -MAX_EXP:
        return np.float32(0.0)
    return SIGMOID_TABLE[int((x + MAX_EXP) * _TABLE_SCALE)]


@njit(inline="always")
def _draw_negative(cum: np.ndarray, u: float) -> int:
    """Index i with cum[i-1] <= u < cum[i]: a word drawn from the unigram^0.75 distribution."""
    lo, hi = 0, cum.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if cum[mid] <= u:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(fastmath=True, inline="always")
def _negative_step(syn1neg, l1, target, label, alpha, work) -> None:
    """One logistic-regression update (Mikolov et al. 2013b, eq. 4): moves syn1neg[target] and
    accumulates the gradient for the input vector(s) into `work`."""
    row = syn1neg[target]
    dot = np.float32(0.0)
    for k in range(row.shape[0]):
        dot += l1[k] * row[k]
    g = (label - _sigmoid(dot)) * alpha
    for k in range(row.shape[0]):
        work[k] += g * row[k]
        row[k] += g * l1[k]


@njit(fastmath=True, cache=True)
def _train_chunk(syn0, syn1neg, ids, sent_starts, s_lo, s_hi, keep, cum, sg, cbow_mean, window, negative,
                 alpha0, min_alpha, word_lo, total_words, epoch, epochs, seed) -> None:
    dim = syn0.shape[1]
    work = np.empty(dim, dtype=np.float32)
    neu1 = np.empty(dim, dtype=np.float32)
    buf = np.empty(sent_starts[s_hi] - sent_starts[s_lo], dtype=np.int32)
    state = _mix(_mix(_mix(np.int64(seed)) ^ np.int64(epoch)) ^ np.int64(s_lo))
    # The learning rate falls linearly with the position in the whole run (all epochs), fixed per chunk.
    progress = (epoch * total_words + word_lo) / (epochs * total_words)
    alpha = np.float32(max(min_alpha, alpha0 - (alpha0 - min_alpha) * progress))
    one, zero = np.float32(1.0), np.float32(0.0)
    for s in range(s_lo, s_hi):
        # Frequent-word subsampling drops words before the windows are formed (as the tool does).
        n = 0
        for p in range(sent_starts[s], sent_starts[s + 1]):
            w = ids[p]
            state = _next(state)
            if keep[w] < _rand32(state):
                continue
            buf[n] = w
            n += 1
        for i in range(n):
            state = _next(state)
            b = _rand32(state) % window  # the window shrinks by b: nearer words are sampled more often
            lo, hi = max(0, i - window + b), min(n, i + window + 1 - b)
            centre = buf[i]
            if sg:
                # skip-gram: each context word's vector predicts the centre word
                for j in range(lo, hi):
                    if j == i:
                        continue
                    ctx = buf[j]
                    l1 = syn0[ctx]
                    work[:] = 0.0
                    for d in range(negative + 1):
                        if d == 0:
                            target, label = centre, one
                        else:
                            state = _next(state)
                            target, label = _draw_negative(cum, _rand32(state) * _INV_2_32), zero
                            if target == centre:
                                continue
                        _negative_step(syn1neg, l1, target, label, alpha, work)
                    for k in range(dim):
                        l1[k] += work[k]
            else:
                # CBOW: the sum (or mean) of the context vectors predicts the centre word
                neu1[:] = 0.0
                count = 0
                for j in range(lo, hi):
                    if j != i:
                        row = syn0[buf[j]]
                        for k in range(dim):
                            neu1[k] += row[k]
                        count += 1
                if count == 0:
                    continue
                if cbow_mean:
                    inv = np.float32(1.0 / count)
                    for k in range(dim):
                        neu1[k] *= inv
                work[:] = 0.0
                for d in range(negative + 1):
                    if d == 0:
                        target, label = centre, one
                    else:
                        state = _next(state)
                        target, label = _draw_negative(cum, _rand32(state) * _INV_2_32), zero
                        if target == centre:
                            continue
                    _negative_step(syn1neg, neu1, target, label, alpha, work)
                for j in range(lo, hi):
                    if j != i:
                        row = syn0[buf[j]]
                        for k in range(dim):
                            row[k] += work[k]


@njit(parallel=True, cache=True)
def train_epochs(syn0, syn1neg, ids, sent_starts, chunk_starts, chunk_words, keep, cum, sg, cbow_mean,
                 window, negative, alpha0, min_alpha, epochs, seed, workers) -> None:
    """Train in place. `ids` holds every sentence's word ids back to back, sentence s being
    ids[sent_starts[s]:sent_starts[s+1]]; chunk c is sentences chunk_starts[c]:chunk_starts[c+1],
    starting at word chunk_words[c]. `keep[w]` is word w's keep probability times 2^32.

    Worker t takes chunks t, t + workers, t + 2 workers, ...: all workers move through the text
    together, as gensim's job queue and the C tool's threads do, so the last updates come from the
    end of the text whatever the number of workers (a model remembers its most recent text best).
    """
    total_words = sent_starts[-1]
    n_chunks = chunk_starts.shape[0] - 1
    for epoch in range(epochs):
        for t in prange(workers):
            for c in range(t, n_chunks, workers):
                _train_chunk(syn0, syn1neg, ids, sent_starts, chunk_starts[c], chunk_starts[c + 1], keep, cum,
                             sg, cbow_mean, window, negative, alpha0, min_alpha, chunk_words[c], total_words,
                             epoch, epochs, seed)
