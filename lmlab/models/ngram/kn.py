"""Interpolated modified Kneser-Ney estimation, computed the way KenLM's `lmplz` computes it.

References: Chen & Goodman 1998, "An empirical study of smoothing techniques for language
modeling" (eq. 26 for the discounts); Heafield et al. 2013, "Scalable modified Kneser-Ney language
model estimation" (the four passes: count, adjust, initial probabilities, interpolate). Arithmetic
is float32 in lmplz's order of operations so that the ARPA entries agree with lmplz's to ~1e-7.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.ngram.count import BOS, EOS, UNK, OrderCounts

F32 = np.float32
FALLBACK = (0.5, 1.0, 1.5)  # lmplz's --discount_fallback default (D1, D2, D3+)


@dataclass
class BackoffTables:
    """A backoff model in ARPA's terms: for each order, sorted keys, log10 prob and log10 backoff."""

    keys: list[np.ndarray]
    prob: list[np.ndarray]      # float32 log10 p
    backoff: list[np.ndarray]   # float32 log10 backoff (zeros for the highest order)


def adjusted_counts(tables: list[OrderCounts]) -> list[np.ndarray]:
    """Highest order: raw counts. Lower orders: the number of distinct words seen to the left
    (continuation counts), except n-grams starting with `<s>`, which keep their raw counts as
    nothing can precede them. `<unk>` and `<s>` unigrams get 0 (lmplz's AdjustCounts)."""
    out = []
    for k, t in enumerate(tables):
        if k == len(tables) - 1:
            adj = t.count.copy()
        else:
            left = np.bincount(tables[k + 1].suffix, minlength=len(t.count)).astype(t.count.dtype)
            adj = np.where(t.bos_start, t.count, left)
        if k == 0:
            adj[UNK] = 0
            adj[BOS] = 0
        out.append(adj)
    return out


def counts_of_counts(adjusted: list[np.ndarray], tables: list[OrderCounts], last_ids: list[int]) -> np.ndarray:
    """n[k, j]: the number of order-(k+1) n-grams with adjusted count j, j = 1..4.

    lmplz's AdjustCounts pass counts the lower-order suffixes of the n-gram that sorts last with
    their raw count instead (its final flush reads `actual_counts`); `last_ids` names them, so the
    discounts (and every probability) match lmplz's exactly."""
    n = np.zeros((len(adjusted), 5), dtype=np.int64)
    for k, adj in enumerate(adjusted):
        n[k] = np.bincount(np.minimum(adj, 5), minlength=6)[:5]
    for k in range(len(adjusted) - 1):
        i = last_ids[k] if k < len(last_ids) else -1
        if i < 0 or (k == 0 and i in (UNK, BOS)):
            continue
        old, new = adjusted[k][i], tables[k].count[i]
        if old < 5:
            n[k, old] -= 1
        if new < 5:
            n[k, new] += 1
    n[:, 0] = 0
    return n


def discounts(n: np.ndarray, fallback: tuple[float, float, float] | None) -> np.ndarray:
    """D[k] = (0, D1, D2, D3+) per order from counts-of-counts: Y = n1 / (n1 + 2 n2),
    D_j = j - (j + 1) Y n_{j+1} / n_j (Chen & Goodman eq. 26), in lmplz's float32 arithmetic."""
    out = np.zeros((len(n), 4), dtype=F32)
    for k, s in enumerate(n):
        problem = None
        if (s[1:4] == 0).any():
            j = int(np.flatnonzero(s[1:4] == 0)[0]) + 1
            problem = (f"no {k + 1}-grams with adjusted count {j}, so the Kneser-Ney discount for count "
                       f"{j + 1 if j < 3 else '3+'} cannot be estimated (is this small or artificial data?)")
        else:
            y = F32(s[1]) / F32(float(s[1]) + 2.0 * float(s[2]))
            for j in (1, 2, 3):
                d = F32(j) - F32(j + 1) * y * F32(s[j + 1]) / F32(s[j])
                out[k, j] = d
                if not 0.0 <= d <= j:
                    problem = f"the {k + 1}-gram discount for adjusted count {j} is out of range: {d:g}"
                    break
        if problem is None:
            continue
        if fallback is None:
            raise LmlabError(f"{problem}. Deduplicate the training text or use more of it, or set "
                             f"discount_fallback=True to substitute D1={FALLBACK[0]:g} D2={FALLBACK[1]:g} "
                             f"D3+={FALLBACK[2]:g} as lmplz --discount_fallback does")
        warnings.warn(f"{problem}; substituting fallback discounts for order {k + 1}: "
                      f"D1={fallback[0]:g} D2={fallback[1]:g} D3+={fallback[2]:g}", stacklevel=4)
        out[k] = (0.0, *fallback)
    return out


def _context(keys: np.ndarray, V: int) -> np.ndarray:
    return (keys // np.uint64(V)).astype(np.int64)


def _gammas(ctx: np.ndarray, adj: np.ndarray, d: np.ndarray, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """Per context: the denominator sum of adjusted counts and gamma = (D1 n1 + D2 n2 + D3 n3+) / sum
    (Chen & Goodman p. 20), float32 as in lmplz's InitialProbabilities."""
    denom = np.bincount(ctx, weights=adj, minlength=n_ctx).astype(F32)  # exact: integer sums < 2^53
    gamma = np.zeros(n_ctx, dtype=F32)
    for j in (1, 2, 3):
        hit = (adj >= 3) if j == 3 else (adj == j)
        gamma = gamma + d[j] * np.bincount(ctx, weights=hit, minlength=n_ctx).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = gamma / denom
    return denom, gamma


def estimate(tables: list[OrderCounts], vocab_size: int, last_ids: list[int],
             fallback: tuple[float, float, float] | None) -> tuple[BackoffTables, np.ndarray, np.ndarray]:
    """Counts -> (ARPA tables, discounts per order, counts-of-counts per order). Consumes `tables`:
    their arrays are released as soon as they are read, to keep the peak memory down."""
    V = vocab_size
    adjusted = adjusted_counts(tables)
    n = counts_of_counts(adjusted, tables, last_ids)
    for t in tables:  # what is left to read is the keys and suffix links: free the rest early
        t.count = t.bos_start = None
    D = discounts(n, fallback)
    keys, probs, backoffs = [], [], []
    interp_below = None
    for k, (t, adj) in enumerate(zip(tables, adjusted)):
        ctx = np.zeros(len(adj), dtype=np.int64) if k == 0 else _context(t.keys, V)
        n_ctx = 1 if k == 0 else len(tables[k - 1].keys)
        denom, gamma = _gammas(ctx, adj, D[k], n_ctx)
        disc = D[k][np.minimum(adj, 3)]
        uninterp = (adj.astype(F32) - disc) / denom[ctx]
        g = gamma[ctx]
        if k == 0:
            uninterp[UNK] = 0.0   # <unk> gets only the interpolated (uniform) mass
            uninterp[BOS] = 1.0   # lmplz: p(<s>) = 1, so scoring <s> explicitly costs nothing
            g = g.copy()
            g[BOS] = 0.0
            # uniform over the vocabulary with <unk> but without <s> (lmplz's Interpolate)
            lower = F32(1.0 / float(F32(len(adj) - 1)))
        else:
            lower = interp_below[t.suffix]
        interp = uninterp + g * lower
        if k > 0:
            # the order below's backoffs are this order's gammas, indexed by context id
            bo = np.zeros(len(gamma), dtype=F32)
            is_ctx = denom > 0
            bo[is_ctx] = np.log10(gamma[is_ctx])
            last_word = (tables[k - 1].keys % np.uint64(V)).astype(np.int64)
            bo[(last_word == EOS) | (last_word == UNK)] = 0.0
            backoffs.append(bo)
        with np.errstate(divide="ignore"):
            probs.append(np.minimum(F32(0.0), np.log10(interp)).astype(F32))
        keys.append(t.keys)
        interp_below = interp
        t.suffix = None
        adjusted[k] = None
    backoffs.append(np.zeros(len(probs[-1]), dtype=F32))
    return BackoffTables(keys, probs, backoffs), D, n
