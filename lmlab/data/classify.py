"""Text-classification data: `lmlab prepare LABELLED.jsonl --format classify --tokenizer MODEL`.

Each line is `{"text": "...", "label": "..."}`, optionally with `"split": "train" | "val" | "test"`
(either every line names its split or none does; then each class is split in the same proportions,
seeded: `stratified_split`). Texts are encoded with the tokenizer of MODEL (the encoder to fine-tune,
`lmlab train --init MODEL`), after the tokenizer's `</s>`, the token every lmlab training document
follows, whose final hidden state a `pool="cls"` classifier reads (BERT's [CLS] position), and cut to
`max_tokens`. Class names are sorted; label id = index. Each split is a padded int32 token matrix
(-1 = padding) and a label vector; `meta.json` carries `{"model": {"n_classes", "labels"}}`, which the
trainer copies into the model's config (as for image classes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.data.images import ImageBatches, stratified_split
from lmlab.data.prepare import SPLITS, PrepareConfig
from lmlab.data.sources import jsonl_records
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "lmlab-labelled-text-v1"
TASK = "classify_text"


def read_labelled(path: str | Path) -> tuple[list[str], list[str], list[str] | None]:
    """(texts, labels, splits or None) of a labelled JSONL file; a bad line is named with file:line."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"labelled data not found: {p}")
    texts, labels, splits = [], [], []
    for n, row in jsonl_records(p):
        where = f"{p}:{n}"
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise LmlabError(f"{where}: expected {{\"text\": \"...\", \"label\": \"...\"}} (strings)")
        if not row["text"].strip():
            raise LmlabError(f"{where}: empty text")
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise LmlabError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if texts and (split is None) != (splits[0] is None):
            raise LmlabError(f"{where}: either every line names its \"split\" or none does")
        texts.append(row["text"])
        labels.append(row["label"])
        splits.append(split)
    if not texts:
        raise LmlabError(f"{p} holds no labelled texts")
    if len(set(labels)) < 2:
        raise LmlabError(f"{p}: a classifier needs at least two labels (found {sorted(set(labels))})")
    return texts, labels, None if splits[0] is None else splits


def prepare_classify(cfg: PrepareConfig, out: Path, force: bool) -> Path:
    from lmlab.io.load import model_tokenizer

    t0 = time.time()
    if cfg.tokenizer in ("char", "word", "bpe"):
        raise LmlabError("--format classify needs --tokenizer MODEL: the encoder to fine-tune (an lmlab run, "
                         "a Hugging Face directory) or a directory holding its tokenizer.json")
    if cfg.max_tokens < 2:
        raise LmlabError("--max_tokens must be at least 2")
    texts, labels, given = read_labelled(cfg.source)
    classes = sorted(set(labels))
    y = np.asarray([classes.index(lab) for lab in labels], dtype=np.int64)
    split_of = (np.asarray([SPLITS.index(s) for s in given]) if given is not None
                else stratified_split(y, cfg.val_fraction, cfg.test_fraction, cfg.seed))
    tok = model_tokenizer(cfg.tokenizer)
    rows = [([tok.eos_id] + tok.encode(t))[:cfg.max_tokens] for t in texts]
    width = max(len(r) for r in rows)
    with atomic_dir(out, replace=force) as tmp:
        tok.save(str(tmp))
        splits = {}
        for k, s in enumerate(SPLITS):
            idx = np.flatnonzero(split_of == k)
            m = np.full((len(idx), width), -1, dtype=np.int32)
            for r, i in enumerate(idx):
                m[r, :len(rows[i])] = rows[i]
            np.save(tmp / f"{s}-tokens.npy", m)
            np.save(tmp / f"{s}-labels.npy", y[idx])
            splits[s] = {"n": int(len(idx)), "tokens": f"{s}-tokens.npy", "labels": f"{s}-labels.npy",
                         "per_class": np.bincount(y[idx], minlength=len(classes)).tolist()}
        if splits["train"]["n"] == 0:
            raise LmlabError(f"{cfg.source}: no training items")
        meta = {"format": FORMAT, "task": TASK, "vocab_size": tok.vocab_size, "max_tokens": width,
                "truncated": sum(len([tok.eos_id] + tok.encode(t)) > cfg.max_tokens for t in texts),
                "model": {"n_classes": len(classes), "labels": classes}, "splits": splits,
                "tokenizer": {"file": "tokenizer.json", "eos_id": tok.eos_id, "pad_id": tok.pad_id},
                "corpus": {"source": str(cfg.source), "n": len(texts)},
                "prepare": {"source": str(cfg.source), "tokenizer": str(cfg.tokenizer), "max_tokens": cfg.max_tokens,
                            "seed": cfg.seed, "out": str(out)},
                "seconds": round(time.time() - t0, 2)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    log.info(f"wrote {out}: {len(classes)} classes, " + ", ".join(f"{s} {splits[s]['n']:,}" for s in SPLITS))
    return out


def is_labelled_text(data_dir: str | Path) -> bool:
    meta = Path(data_dir) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT


class TextClassSplit:
    """One split of a prepared labelled-text directory."""

    is_images = False

    def __init__(self, data_dir: str | Path, split: str, max_len: int = 0):
        """`max_len` > 0: texts cut to that many tokens (a model's block_size)."""
        self.dir, self.max_len = Path(data_dir), max_len
        self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise LmlabError(f"{self.dir}: not a prepared labelled-text directory (lmlab prepare --format classify)")
        if split not in self.meta["splits"]:
            raise LmlabError(f"{data_dir} has no split '{split}' (has {', '.join(self.meta['splits'])})")
        self.split, self.task = split, self.meta["task"]
        info = self.meta["splits"][split]
        self.tokens = np.load(self.dir / info["tokens"])
        self.labels = np.load(self.dir / info["labels"])
        self.pad_id = int(self.meta["tokenizer"]["pad_id"])

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, *_) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for examples `idx`, cut to the longest of them."""
        rows = self.tokens[idx]
        width = max(1, int((rows >= 0).sum(1).max()))
        width = min(width, self.max_len) if self.max_len > 0 else width
        rows = torch.from_numpy(rows[:, :width].astype(np.int64))
        mask = (rows >= 0).long()
        return {"input_ids": rows.masked_fill(mask == 0, self.pad_id), "attention_mask": mask,
                "labels": torch.from_numpy(self.labels[idx].astype(np.int64))}


class TextClassBatches(ImageBatches):
    """Batches of a labelled-text split: ImageBatches' seeded order per epoch (batch i depends on
    (seed, i) alone, so a resumed run sees the same batches), without augmentation."""

    def __init__(self, data: TextClassSplit, batch_size: int, seed: int = 0, max_len: int = 0):
        if len(data) == 0:
            raise LmlabError(f"split '{data.split}' of {data.dir} holds no examples")
        data.max_len = max_len  # the model's block_size: longer texts are cut
        super().__init__(data, batch_size, seed=seed)  # type: ignore[arg-type]

    def state_dict(self) -> dict:
        return {"kind": "labelled-text", "seed": self.seed, "step": self.step}
