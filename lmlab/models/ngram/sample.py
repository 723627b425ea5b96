"""Next-word distributions and sampling for the n-gram LM (ngram.py).

`next_logprobs` builds the whole distribution over the vocabulary for one context in a few array
operations: the unigram row plus the backoffs, overwritten by each longer context's entries (which
sit in one contiguous range of the sorted keys). Drawing goes through lmlab.nn.sampling, so
temperature / top-k / top-p mean the same as for the neural models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.models.ngram.count import BOS, EOS, UNK
from lmlab.nn.sampling import sample as draw

if TYPE_CHECKING:
    from lmlab.models.ngram.model import NGramModel


def _children(model: NGramModel, k: int, ctx_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Words and rows of the order-(k+1) entries whose context is the order-k n-gram `ctx_id`."""
    V = np.uint64(len(model.vocab))
    lo, hi = np.searchsorted(model.keys[k], [np.uint64(ctx_id) * V, np.uint64(ctx_id + 1) * V])
    rows = np.arange(lo, hi)
    return (model.keys[k][rows] % V).astype(np.int64), rows


def next_logprobs(model: NGramModel, context: Sequence[int]) -> np.ndarray:
    """log10 p(w | context) for every internal word id w; see NGramModel.next_logprobs."""
    N, V = model.order, len(model.vocab)
    ctx = np.asarray(context, dtype=np.int64)[max(0, len(context) - (N - 1)):] if N > 1 else np.zeros(0, np.int64)
    tokens = np.append(ctx, UNK)
    span = np.minimum(np.arange(1, len(tokens) + 1), 255).astype(np.uint8)
    if len(ctx) == N - 1 and len(ctx) and ctx[0] != BOS:
        span[:] = 255  # a window cut from a longer context: no sentence start inside
    ids = model._ids(tokens, span)
    A = min(N, int(span[-1])) - 1                 # the context length available
    cids = [int(ids[j][-2]) for j in range(A)]     # cids[j]: id of the context of length j + 1
    L = 0                                          # the longest context the model has seen
    while L < A and cids[L] >= 0:
        L += 1
    with np.errstate(divide="ignore", invalid="ignore"):
        if model.tables is not None:               # ARPA back-off
            bo = np.asarray([model.tables.backoff[j][cids[j]] for j in range(L)], dtype=np.float64)
            cum = np.append(np.cumsum(bo[::-1])[::-1], 0.0)   # cum[k]: backoffs of contexts k+1..L
            lp = model.tables.prob[0].astype(np.float64) + cum[0]
            for k in range(1, L + 1):
                words, rows = _children(model, k, cids[k - 1])
                lp[words] = model.tables.prob[k][rows] + cum[k]
        elif model.config.smoothing == "stupid_backoff":
            la = math.log10(model.config.alpha)
            lp = np.log10(model.counts[0] / model.totals[0][0]) + A * la
            for k in range(1, L + 1):
                words, rows = _children(model, k, cids[k - 1])
                lp[words] = np.log10(model._ratio(k, rows)) + (A - k) * la
        else:                                      # mle / add-k: the full available context only
            num, total = np.zeros(V), 0.0
            if A == 0:
                num, total = model.counts[0].astype(np.float64), float(model.totals[0][0])
                num[BOS] = 0.0
            elif L == A:
                words, rows = _children(model, A, cids[A - 1])
                num[words], total = model.counts[A][rows], float(model.totals[A][cids[A - 1]])
            if model.config.smoothing == "add_k":
                a = model.config.add_k
                lp = np.log10((num + a) / (total + a * (V - 1)))
            else:
                lp = np.log10(num / total) if total > 0 else np.full(V, -np.inf)
    lp[BOS] = -np.inf  # ARPA's p(<s>) = 1 only makes <s> free to score; it is never next
    return lp


def sample(model: NGramModel, n: int = 1, *, max_tokens: int = 50, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, prefix: str = "", seed: int | None = None) -> list[str]:
    """Sentences drawn word by word from `<s>` (plus `prefix`) until `</s>` or `max_tokens`."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**31))
    start = [BOS] + [int(i) for i in model.encode(prefix)]
    out = []
    for _ in range(n):
        ctx, words = list(start), []
        for _ in range(max_tokens):
            lp = next_logprobs(model, ctx) * math.log(10.0)
            lp[UNK] = -np.inf
            if not np.isfinite(lp).any():
                raise LmlabError(f"the {model.config.smoothing} model has no continuation for "
                                 f"'{' '.join(model.vocab[i] for i in ctx[1:])}'")
            w = int(draw(torch.from_numpy(lp)[None].float(), temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=gen)[0])
            if w == EOS:
                break
            words.append(model.vocab[w])
            ctx.append(w)
        out.append(" ".join(([prefix] if prefix else []) + words))
    return out
