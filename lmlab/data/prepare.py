"""Text -> tokenizer + token shards: `lmlab prepare`.

Documents are assigned to train/val/test by rank of a seeded hash of their content, so the split is
deterministic, never cuts a document, and puts exact duplicates side by side (hence almost always in
the same split). Each split is a list of uint16/uint32 memmap shards; documents are concatenated with
the tokenizer's `</s>` after each one. Everything is written into a temporary directory and renamed
into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.config import to_dict
from lmlab.data.sources import Corpus
from lmlab.errors import LmlabError
from lmlab.io.load import model_tokenizer
from lmlab.tokenizers import Tokenizer, train_tokenizer
from lmlab.utils.atomic import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMAT = "lmlab-tokens-v1"


@dataclass(kw_only=True)
class PrepareConfig:
    source: str = "stdlib-docs"       # path, folder, glob, .jsonl, or stdlib-docs / stdlib-code
    format: str = "text"              # text | chat: a JSONL of {"messages": [...]} conversations for SFT,
                                      # rendered with the chat template of --tokenizer MODEL (lmlab/data/chat.py)
                                      # | classify: a JSONL of {"text", "label"} (lmlab/data/classify.py)
    out: str = ""                     # data directory to create (default: data/<source name>)
    tokenizer: str = "bpe"            # char | word | bpe, a directory holding tokenizer.json, or a model
                                      # (GGUF, HF directory, lmlab run) whose tokenizer to use (train --init)
    vocab_size: int = 4096            # BPE merges target; cap for char/word (0 = no cap)
    min_count: int = 2                # rarer words/chars become <unk>; BPE min merge frequency
    doc_split: str = "paragraph"      # how a plain text file is cut into documents: file|paragraph|line
    jsonl_field: str = "text"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 1337
    shard_tokens: int = 50_000_000    # tokens per shard file
    max_tokens: int = 128             # --format classify: each text cut to this many tokens
    splits: str = "hash"              # hash: documents split by a seeded hash of their text | files: the
                                      # source is a folder of given train/valid/test .txt files (as PTB)


def default_out(source: str) -> str:
    name = Path(source.rstrip("/*")).stem or "corpus"
    return str(Path("data") / name)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to `<split>-NNNN.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.cap = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):04d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "n_tokens": 0})
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self._count >= self.cap:
                self.close()
                self._open()
            take = min(len(tokens), self.cap - self._count)
            self._file.write(tokens[:take].tobytes())
            self._count += take
            self.shards[-1]["n_tokens"] += take
            tokens = tokens[take:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def assign_splits(corpus: Corpus | list[str], seed: int, val_fraction: float, test_fraction: float,
                  name: str = "") -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per document, by rank of a seeded content hash."""
    name = name or corpus.source
    key = seed.to_bytes(8, "little", signed=True)
    hashes = [int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8, key=key).digest(), "little")
              for d in corpus]
    n = len(hashes)
    if n == 0:
        raise LmlabError(f"corpus '{name}' is empty: it holds no non-blank text")
    order = np.argsort(np.array(hashes, dtype=np.uint64), kind="stable")
    n_val = math.ceil(val_fraction * n) if val_fraction > 0 else 0
    n_test = math.ceil(test_fraction * n) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise LmlabError(
            f"corpus '{name}' has only {n} document(s), too few for train/val/test splits; "
            "add text, or cut it into more documents with --doc_split=line")
    split = np.zeros(n, dtype=np.int8)
    split[order[:n_val]] = 1
    split[order[n_val:n_val + n_test]] = 2
    return split


def prepare(cfg: PrepareConfig, *, force: bool = False) -> Path:
    out = Path(cfg.out or default_out(cfg.source))
    if out.exists() and not force:
        raise LmlabError(f"data directory {out} already exists; pass --force to rebuild it, or choose --out")
    if cfg.format == "chat":
        from lmlab.data.chat import prepare_chat

        return prepare_chat(cfg, out, force)
    if cfg.format == "classify":
        from lmlab.data.classify import prepare_classify

        return prepare_classify(cfg, out, force)
    if cfg.format != "text":
        raise LmlabError(f"unknown format '{cfg.format}': text | chat | classify")
    if cfg.splits == "files":
        return _prepare_split_files(cfg, out, force)
    if cfg.splits != "hash":
        raise LmlabError(f"unknown splits '{cfg.splits}': hash (a seeded hash per document) or files")
    corpus = Corpus(cfg.source, doc_split=cfg.doc_split, jsonl_field=cfg.jsonl_field)
    t0 = time.time()
    provenance = corpus.describe()
    split_of = assign_splits(corpus, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    log.info(f"corpus {cfg.source}: {len(split_of)} documents "
        f"({int((split_of == 0).sum())} train / {int((split_of == 1).sum())} val / {int((split_of == 2).sum())} test)")

    with atomic_dir(out, replace=force) as tmp:
        tok = _get_tokenizer(cfg, corpus, split_of)
        tok.save(str(tmp))
        dtype = token_dtype(tok.vocab_size)
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in SPLITS}
        stats = {s: {"n_docs": 0, "n_bytes": 0} for s in SPLITS}
        eos = tok.eos_id
        batch: list[tuple[int, str]] = []

        def flush() -> None:
            for (s, doc), ids in zip(batch, tok.encode_batch([d for _, d in batch])):
                if not ids or ids[-1] != eos:
                    ids.append(eos)
                name = SPLITS[s]
                writers[name].write(np.asarray(ids, dtype=np.int64))
                stats[name]["n_docs"] += 1
                # bytes of the document plus one for the separator that </s> stands for
                stats[name]["n_bytes"] += len(doc.encode("utf-8")) + 1
            batch.clear()

        for i, doc in enumerate(corpus):
            batch.append((int(split_of[i]), doc))
            if len(batch) >= 256:
                flush()
        flush()
        for w in writers.values():
            w.close()

        splits = {}
        for s in SPLITS:
            n_tokens = sum(sh["n_tokens"] for sh in writers[s].shards)
            splits[s] = {"shards": writers[s].shards, "n_tokens": n_tokens, **stats[s]}
        _write_meta(tmp, out, cfg, tok, dtype, provenance, splits, t0)
    return out


def _write_meta(tmp: Path, out: Path, cfg: PrepareConfig, tok: Tokenizer, dtype: np.dtype, corpus: dict,
                splits: dict, t0: float, extra: dict | None = None) -> None:
    if splits["train"]["n_tokens"] == 0:
        raise LmlabError(f"corpus '{cfg.source}' produced no training tokens")
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "eos_id": tok.eos_id,
                      "specials": tok.specials.as_dict()},
        "corpus": corpus,
        "splits": splits,
        "prepare": to_dict(cfg) | {"out": str(out)},
        "seconds": round(time.time() - t0, 2),
        **(extra or {}),
    }
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    log.info(f"wrote {out}: " + ", ".join(f"{s} {splits[s]['n_tokens']:,} tokens" for s in SPLITS)
             + f" (vocab {tok.vocab_size}, {dtype.name})")


# file names that mark a given split ("ptb.train.txt", "valid.txt", "wiki.test.tokens.txt", ...)
SPLIT_FILES = {"train": ("train",), "val": ("valid", "val", "dev"), "test": ("test",)}


def split_files(folder: Path) -> dict[str, Path]:
    """train/val/test text files of a folder, found by name (ptb.train.txt, valid.txt, ...)."""
    texts = sorted(folder.glob("*.txt"))
    found = {}
    for split, names in SPLIT_FILES.items():
        hits = [p for p in texts if any(n in p.name.lower().split(".") or p.stem.lower().endswith(n)
                                        for n in names)]
        if len(hits) != 1:
            raise LmlabError(f"{folder}: need exactly one {split} file among {[p.name for p in texts]} "
                             f"(a .txt file whose name contains {' or '.join(names)}); found {len(hits)}")
        found[split] = hits[0]
    return found


def _prepare_split_files(cfg: PrepareConfig, out: Path, force: bool) -> Path:
    """`splits=files`: each given file is one split, tokenized whole (a word tokenizer closes each line
    with </s>, as KenLM and Mikolov's PTB setup read it); the tokenizer is trained on the train file."""
    t0 = time.time()
    folder = Path(cfg.source)
    if not folder.is_dir():
        raise LmlabError(f"--splits=files needs a folder of train/valid/test .txt files, not {folder}")
    files = split_files(folder)
    try:
        texts = {s: files[s].read_text(encoding="utf-8") for s in SPLITS}
    except UnicodeDecodeError as e:
        raise LmlabError(f"{folder}: a split file is not UTF-8 text ({e})") from None
    if not texts["train"].split():
        raise LmlabError(f"{files['train']} holds no text")
    with atomic_dir(out, replace=force) as tmp:
        if cfg.tokenizer in ("char", "word", "bpe"):
            tok = train_tokenizer(cfg.tokenizer, [texts["train"]], vocab_size=cfg.vocab_size,
                                  min_count=cfg.min_count)
        else:
            tok = model_tokenizer(cfg.tokenizer)
        tok.save(str(tmp))
        dtype = token_dtype(tok.vocab_size)
        splits = {}
        for s in SPLITS:
            w = ShardWriter(tmp, s, dtype, cfg.shard_tokens)
            ids = np.asarray(tok.encode(texts[s]), dtype=np.int64)
            w.write(ids)
            w.close()
            splits[s] = {"shards": w.shards, "n_tokens": len(ids), "n_docs": texts[s].count("\n"),
                         "n_bytes": len(texts[s].encode("utf-8"))}
        corpus = {"source": str(folder), "files": {s: str(p) for s, p in files.items()}}
        _write_meta(tmp, out, cfg, tok, dtype, corpus, splits, t0)
    return out


def _get_tokenizer(cfg: PrepareConfig, corpus: Corpus, split_of: np.ndarray) -> Tokenizer:
    if cfg.tokenizer in ("char", "word", "bpe"):
        train_docs = (d for i, d in enumerate(corpus) if split_of[i] == 0)
        return train_tokenizer(cfg.tokenizer, train_docs, vocab_size=cfg.vocab_size, min_count=cfg.min_count)
    return model_tokenizer(cfg.tokenizer)  # a model's own (GGUF, HF directory, run) or a tokenizer.json


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise LmlabError(f"{data_dir} is not a prepared data directory (no meta.json); run `lmlab prepare` first")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise LmlabError(f"{path}: unknown data format {meta.get('format')!r}")
    return meta
