"""Synthetic sequence-to-sequence tasks that lmlab makes itself (no download): reverse or sort words.

Sources are 4-8 words drawn uniformly from a small vocabulary (the NATO spelling alphabet); the target
is the same words reversed, or sorted (alphabetically, which is the list's order). Both are exactly
solvable and keep the length, a clean test bed for autoregressive versus non-autoregressive decoding
(lmlab/generate/nar.py, benchmarks/nar_vs_ar.py). Reversal is a fixed permutation, so each output
position can be copied from one input position; in sorting an output token depends on the ranks of all
the inputs, and a left-to-right decoder can lean on the tokens it already wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmlab.utils.atomic import atomic_write_text

WORDS = ("alfa bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def word_pairs(task: str, n: int, seed: int = 0, min_words: int = 4, max_words: int = 8,
               vocab: int = len(WORDS)) -> list[dict[str, str]]:
    """`n` {"source", "target"} pairs over the first `vocab` words; `task` is reverse | sort."""
    if task not in ("reverse", "sort"):
        raise ValueError(f"unknown task '{task}' (reverse | sort)")
    if not 1 <= vocab <= len(WORDS) or not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= vocab <= {len(WORDS)} and 1 <= min_words <= max_words")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(0, vocab, size=int(rng.integers(min_words, max_words + 1))).tolist()
        tgt = idx[::-1] if task == "reverse" else sorted(idx)
        out.append({"source": " ".join(WORDS[i] for i in idx), "target": " ".join(WORDS[i] for i in tgt)})
    return out


def reversal_pairs(n: int, seed: int = 0, **kw) -> list[dict[str, str]]:
    return word_pairs("reverse", n, seed, **kw)


def write_jsonl(pairs: list[dict[str, str]], path: str | Path) -> Path:
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
    return Path(path)
