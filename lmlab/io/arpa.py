"""ARPA back-off language model files: write an n-gram model, read one written by KenLM or SRILM.

Format (Doug Paul's ARPA format, as SRILM's ngram-format(5) and KenLM's lmplz write it):

    \\data\\
    ngram 1=<count>            one line per order
    \\1-grams:
    <log10 p>\\t<w1>\\t<log10 backoff>        backoff column on every order but the highest
    ...
    \\end\\

Files ending in `.gz` are (de)compressed on the fly. Numbers are written with the fewest digits
that read back as the same float32 (KenLM stores float32).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.ngram.count import SPECIAL_WORDS, UNK
from lmlab.models.ngram.kn import BackoffTables
from lmlab.models.ngram.model import NGramConfig, NGramModel
from lmlab.utils.atomic import atomic_open

_CHUNK = 1 << 20
_MISSING_UNK = np.float32(-100.0)  # what KenLM substitutes when an ARPA file lacks <unk>


def format_floats(x: np.ndarray) -> list[str]:
    """Each float32 as '%g' text with the fewest significant digits (6 to 9) that reads back as the
    same float32; the digit count is found numerically (rounding in float64), then formatted once."""
    x = np.asarray(x, dtype=np.float32)
    v = x.astype(np.float64)
    digits = np.full(len(x), 9, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        exp10 = np.floor(np.log10(np.abs(v)))
        for d in (8, 7, 6):
            scale = 10.0 ** (d - 1 - exp10)
            same = (np.round(v * scale) / scale).astype(np.float32) == x
            digits[same] = d
    digits[~np.isfinite(v) | (v == 0)] = 6
    return [f"{f:.{d}g}" for d, f in zip(digits.tolist(), v.tolist())]


def _word_columns(model: NGramModel, k: int, rows: np.ndarray) -> list[np.ndarray]:
    """Word ids w1..w(k+1) of the order-(k+1) entries `rows`."""
    V = np.uint64(len(model.vocab))
    cols = []
    for j in range(k, -1, -1):
        keys = model.keys[j][rows]
        cols.append((keys % V).astype(np.int64))
        rows = (keys // V).astype(np.int64)
    return cols[::-1]


def _open_text(path: Path, f) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=f, mode="wb", mtime=0), encoding="utf-8")
    return io.TextIOWrapper(f, encoding="utf-8")


def write_arpa(model: NGramModel, path: str | os.PathLike) -> None:
    """Write a back-off model (Kneser-Ney, or one read from ARPA) as an ARPA file, atomically."""
    if model.tables is None:
        raise LmlabError(f"only back-off models (smoothing=kneser_ney) can be written as ARPA; "
                         f"this one uses {model.config.smoothing}")
    bad = [w for w in model.vocab if not w or any(c.isspace() for c in w)]
    if bad:
        raise LmlabError(f"ARPA words cannot be empty or contain whitespace: {bad[:3]!r}")
    path = Path(path)
    words = np.array(model.vocab, dtype=object)
    t = model.tables
    N = model.order
    with atomic_open(path, "wb") as raw:
        out = _open_text(path, raw)
        out.write("\\data\\\n")
        for k in range(N):
            out.write(f"ngram {k + 1}={len(t.prob[k])}\n")
        for k in range(N):
            out.write(f"\n\\{k + 1}-grams:\n")
            for lo in range(0, len(t.prob[k]), _CHUNK):
                rows = np.arange(lo, min(lo + _CHUNK, len(t.prob[k])))
                cols = _word_columns(model, k, rows)
                text = words[cols[0]]
                for c in cols[1:]:
                    text = text + " " + words[c]
                prob = format_floats(t.prob[k][rows])
                if k < N - 1:
                    bo = format_floats(t.backoff[k][rows])
                    lines = [f"{p}\t{w}\t{b}\n" for p, w, b in zip(prob, text.tolist(), bo)]
                else:
                    lines = [f"{p}\t{w}\n" for p, w in zip(prob, text.tolist())]
                out.write("".join(lines))
        out.write("\n\\end\\\n")
        out.flush()
        if path.suffix == ".gz":
            out.close()  # closes the gzip stream, not `raw`
        else:
            out.detach()


class _Lines:
    """Numbered lines of a (possibly gzipped) text file, for error messages with file:line."""

    def __init__(self, path: Path):
        self.path, self.lineno = path, 0
        self.pending: list[str] = []  # a line read ahead, handed out again first
        opener = gzip.open if path.suffix == ".gz" else open
        self.f = opener(path, "rt", encoding="utf-8")

    def __iter__(self) -> Iterator[str]:
        while True:
            if self.pending:
                yield self.pending.pop()
                continue
            line = self.f.readline()
            if not line:
                return
            self.lineno += 1
            yield line.rstrip("\r\n")

    def error(self, message: str) -> LmlabError:
        return LmlabError(f"{self.path}:{self.lineno}: {message}")


def read_arpa(path: str | os.PathLike) -> NGramModel:
    """Read an ARPA file into a queryable back-off model."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"ARPA file not found: {path}")
    src = _Lines(path)
    lines = iter(src)
    try:
        counts = _read_header(src, lines)
        entries = [_read_order(src, lines, k + 1, n, len(counts)) for k, n in enumerate(counts)]
        for line in lines:
            if line.strip() == "\\end\\":
                break
            if line.strip():
                raise src.error(f"expected \\end\\, found {line[:60]!r}")
        else:
            raise src.error("file ends without \\end\\")
    except UnicodeDecodeError:
        raise src.error("not UTF-8 text") from None
    finally:
        src.f.close()
    return _build(path, entries)


def _read_header(src: _Lines, lines: Iterator[str]) -> list[int]:
    for line in lines:
        if line.strip() == "\\data\\":
            break
    else:
        raise src.error("no \\data\\ section: not an ARPA file")
    counts: list[int] = []
    for line in lines:
        s = line.strip()
        if not s:
            if counts:
                return counts
            continue
        if not s.startswith("ngram ") or "=" not in s:
            raise src.error(f"expected 'ngram K=COUNT', found {s[:60]!r}")
        k, _, n = s[6:].partition("=")
        try:
            k, n = int(k), int(n)
        except ValueError:
            raise src.error(f"bad count line {s!r}") from None
        if k != len(counts) + 1 or n < 0:
            raise src.error(f"expected the count of order {len(counts) + 1}, found {s!r}")
        counts.append(n)
    raise src.error("file ends inside the \\data\\ section")


def _read_order(src: _Lines, lines: Iterator[str], k: int, n: int, N: int):
    header = f"\\{k}-grams:"
    for line in lines:
        if line.strip() == header:
            break
        if line.strip():
            raise src.error(f"expected {header}, found {line[:60]!r}")
    else:
        raise src.error(f"file ends before {header}")
    grams, prob, backoff = [], np.empty(n, np.float32), np.zeros(n, np.float32)
    for i in range(n):
        line = next(lines, None)
        if line is None or not line.strip() or line.startswith("\\"):
            raise src.error(f"the header promises {n} {k}-grams but the section has {i}")
        parts = line.split()
        if len(parts) not in (k + 1, k + 2) or (len(parts) == k + 2 and k == N):
            raise src.error(f"expected log10 prob, {k} words{' and a backoff' if k < N else ''}: {line[:80]!r}")
        try:
            prob[i] = float(parts[0])
            if len(parts) == k + 2:
                backoff[i] = float(parts[-1])
        except ValueError:
            raise src.error(f"not a number in {line[:80]!r}") from None
        grams.append(parts[1:k + 1])
    nxt = next(lines, "")
    if nxt.startswith("\\"):
        src.pending.append(nxt)
    elif nxt.strip():
        raise src.error(f"the header promises {n} {k}-grams but the section has more")
    return grams, prob, backoff, src.lineno


def _build(path: Path, entries) -> NGramModel:
    unigrams, uprob, ubo, _ = entries[0]
    vocab = list(SPECIAL_WORDS)
    order_in_file = [g[0] for g in unigrams]
    missing = [w for w in ("<s>", "</s>") if w not in order_in_file]
    if missing:
        raise LmlabError(f"{path}: the unigrams lack {', '.join(missing)}")
    vocab += [w for w in order_in_file if w not in SPECIAL_WORDS]
    index = {w: i for i, w in enumerate(vocab)}
    if len(set(order_in_file)) != len(order_in_file):
        raise LmlabError(f"{path}: a unigram appears twice")
    V = len(vocab)
    prob1, bo1 = np.zeros(V, np.float32), np.zeros(V, np.float32)
    prob1[UNK] = _MISSING_UNK
    rows = np.array([index[w] for w in order_in_file], dtype=np.int64)
    prob1[rows], bo1[rows] = uprob, ubo
    keys, probs, bos = [np.arange(V, dtype=np.uint64)], [prob1], [bo1]
    for k, (grams, prob, backoff, end_line) in enumerate(entries[1:], start=1):
        try:
            ids = np.array([[index[w] for w in g] for g in grams], dtype=np.int64).reshape(len(grams), k + 1)
        except KeyError as e:
            raise LmlabError(f"{path}: the {k + 1}-grams use {e.args[0]!r}, which is not a unigram") from None
        ctx = ids[:, 0]
        for j in range(1, k):  # the context's id, order by order
            ctx = _lookup(keys[j], ctx, ids[:, j], V)
        bad = np.flatnonzero(ctx < 0)
        if len(bad):
            g = " ".join(grams[bad[0]])
            raise LmlabError(f"{path}: the {k + 1}-gram '{g}' has no entry for its context (section ending "
                             f"at line {end_line}); KenLM and SRILM write every context")
        key = ctx.astype(np.uint64) * np.uint64(V) + ids[:, k].astype(np.uint64)
        perm = np.argsort(key, kind="stable")
        key = key[perm]
        if len(key) > 1 and (key[1:] == key[:-1]).any():
            raise LmlabError(f"{path}: a {k + 1}-gram appears twice")
        keys.append(key)
        probs.append(prob[perm])
        bos.append(backoff[perm])
    config = NGramConfig(order=len(keys))
    return NGramModel(config, vocab, keys, tables=BackoffTables(keys, probs, bos))


def _lookup(keys: np.ndarray, ctx: np.ndarray, word: np.ndarray, V: int) -> np.ndarray:
    key = ctx.astype(np.uint64) * np.uint64(V) + word.astype(np.uint64)
    if not len(keys):
        return np.full(len(ctx), -1, np.int64)
    pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
    return np.where((ctx >= 0) & (keys[pos] == key), pos, -1)
