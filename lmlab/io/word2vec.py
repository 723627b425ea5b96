"""The word2vec vector file formats (Mikolov's C tool), as gensim's `save_word2vec_format` writes them.

Both start with a header line "<words> <dimensions>\\n". Then, one entry per word:
  * text:   "word v1 v2 ... vD\\n", values in decimal;
  * binary: "word " followed by D little-endian float32 values (4 D bytes) and "\\n". The C tool ends
    each entry with "\\n"; gensim writes none, so the reader drops newlines before a word.
Words are UTF-8 and cannot hold spaces. `load_word2vec` tells the two formats apart by content.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.word2vec.keyed_vectors import KeyedVectors
from lmlab.utils.atomic import atomic_open


def save_word2vec(kv: KeyedVectors, path: str | os.PathLike, binary: bool = True) -> None:
    for w in kv.index_to_key:
        if not w or any(c.isspace() for c in w):
            raise LmlabError(f"word2vec format: the word {w!r} is empty or holds whitespace")
    with atomic_open(path, "wb") as f:
        f.write(f"{len(kv)} {kv.vector_size}\n".encode())
        vectors = kv.vectors.astype("<f4")
        for w, v in zip(kv.index_to_key, vectors):
            if binary:
                f.write(w.encode("utf-8") + b" " + v.tobytes() + b"\n")
            else:
                # repr of a float32 round-trips exactly
                f.write((w + " " + " ".join(repr(float(x)) for x in v) + "\n").encode("utf-8"))


def _header(line: bytes, path: Path) -> tuple[int, int]:
    try:
        n, dim = (int(x) for x in line.split())
    except ValueError:
        raise LmlabError(f"{path}:1: a word2vec file starts with '<words> <dimensions>', found "
                         f"{line[:60]!r}") from None
    if n < 0 or dim < 1:
        raise LmlabError(f"{path}:1: bad header {n} words x {dim} dimensions")
    return n, dim


def _looks_like_text(first_entry: bytes) -> bool:
    """A text entry is printable UTF-8; packed float32 values almost never are (zeros are NULs)."""
    try:
        return first_entry.decode("utf-8").rstrip("\r").replace("\t", " ").isprintable()
    except UnicodeDecodeError:
        return False


def load_word2vec(path: str | os.PathLike, binary: bool | None = None) -> KeyedVectors:
    """Read a word2vec text or binary file (binary=None: decide from the content)."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such vectors file: {path}")
    data = path.read_bytes()
    end = data.find(b"\n")
    if end < 0:
        raise LmlabError(f"{path}:1: no header line (is this a word2vec file?)")
    n, dim = _header(data[:end], path)
    body = data[end + 1:]
    if binary is None:
        nl = body.find(b"\n")
        binary = n > 0 and not _looks_like_text(body[:nl if nl >= 0 else len(body)])
    keys, vectors = (_read_binary if binary else _read_text)(body, n, dim, path)
    return KeyedVectors(keys, vectors)


def _read_text(body: bytes, n: int, dim: int, path: Path) -> tuple[list[str], np.ndarray]:
    try:
        lines = body.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LmlabError(f"{path}: not UTF-8 text (byte offset {e.start}); pass binary=True for a binary file") \
            from None
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) != n:
        raise LmlabError(f"{path}: the header announces {n} words but the file holds {len(lines)}")
    keys, vectors = [], np.empty((n, dim), dtype=np.float32)
    for i, line in enumerate(lines):
        parts = line.rstrip().split(" ")
        if len(parts) != dim + 1:
            raise LmlabError(f"{path}:{i + 2}: expected a word and {dim} numbers, found {len(parts)} fields")
        try:
            vectors[i] = [float(x) for x in parts[1:]]
        except ValueError:
            raise LmlabError(f"{path}:{i + 2}: a value of '{parts[0]}' is not a number") from None
        keys.append(parts[0])
    return keys, vectors


def _read_binary(body: bytes, n: int, dim: int, path: Path) -> tuple[list[str], np.ndarray]:
    keys, vectors, pos, width = [], np.empty((n, dim), dtype=np.float32), 0, 4 * dim
    for i in range(n):
        while pos < len(body) and body[pos:pos + 1] == b"\n":
            pos += 1
        space = body.find(b" ", pos)
        if space < 0 or space + 1 + width > len(body):
            raise LmlabError(f"{path}: binary file ends inside entry {i + 1} of {n} (truncated, or text "
                             "with the wrong header?)")
        try:
            keys.append(body[pos:space].decode("utf-8"))
        except UnicodeDecodeError:
            raise LmlabError(f"{path}: entry {i + 1}: the word is not UTF-8") from None
        vectors[i] = np.frombuffer(body, dtype="<f4", count=dim, offset=space + 1)
        pos = space + 1 + width
    if body[pos:].strip(b"\n"):
        raise LmlabError(f"{path}: {len(body) - pos} bytes follow the {n} announced entries")
    return keys, vectors
