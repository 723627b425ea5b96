"""(source, target) pairs from JSONL, batched for sequence-to-sequence training.

A pairs file holds one JSON object per line with string fields "source" and "target". Pairs go to
train or val by the rank of a hash of their content (the lowest 5%, at least one, are val), as
`lmlab prepare` splits documents. Two batch kinds, both dicts of model keyword arguments:

- "seq2seq" (BART fine-tuning): `input_ids` (source + </s>, right-padded), `attention_mask`, and
  `targets` (target + </s>, -100 on pads); the model shifts the targets right for teacher forcing.
- "cmlm" (a conditional masked LM; Ghazvininejad et al. 2019, section 3): the target (no </s>) with
  n ~ Uniform{1, ..., len} of its tokens, chosen uniformly, replaced by <mask> as `decoder_input_ids`;
  `targets` are the original tokens at those positions (-100 elsewhere); `target_lengths` train the
  model's length predictor.

Batch i draws its pairs (and masks) from a generator seeded with (seed, i) alone, so resuming is exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlab.data.sources import jsonl_records
from lmlab.errors import LmlabError

FIELDS = ("source", "target")
VAL_FRACTION = 0.05


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(source, target) of every non-blank line; a bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"pairs file not found: {p}")
    pairs = []
    for lineno, record in jsonl_records(p):
        if not isinstance(record, dict):
            raise LmlabError(f"{p}:{lineno}: expected an object with fields {' and '.join(FIELDS)}")
        for name in FIELDS:
            if name not in record:
                raise LmlabError(f"{p}:{lineno}: no field '{name}' (each line needs 'source' and 'target')")
            if not isinstance(record[name], str) or not record[name].strip():
                raise LmlabError(f"{p}:{lineno}: field '{name}' must be a non-empty string")
        pairs.append((record["source"], record["target"]))
    if not pairs:
        raise LmlabError(f"{p} holds no pairs")
    return pairs


def split_pairs(pairs: list[tuple[str, str]], split: str, val_fraction: float = VAL_FRACTION) -> list[tuple[str, str]]:
    """The pairs of `split` (train | val): val is the lowest-hashing fraction (at least one pair)."""
    if split not in ("train", "val"):
        raise LmlabError(f"pairs have a train and a val split, not '{split}'")
    if len(pairs) < 2:
        raise LmlabError("a pairs file needs at least two pairs (one is held out for validation)")
    keys = [hashlib.sha1(json.dumps(p).encode("utf-8")).digest() for p in pairs]
    order = sorted(range(len(pairs)), key=keys.__getitem__)
    n_val = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
    val = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if (i in val) == (split == "val")]


@dataclass(kw_only=True)
class PairConfig:
    pad_id: int
    eos_id: int
    mask_id: int
    block_size: int
    masked: bool = False  # the "cmlm" batches instead of "seq2seq"


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    while ids and ids[-1] == eos_id:  # word tokenizers close every line with </s>
        ids = ids[:-1]
    return ids


def encode_pairs(tok, pairs: list[tuple[str, str]], cfg: PairConfig) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair: source + </s>, and target + </s> (seq2seq) or the bare target (cmlm)."""
    out = []
    srcs, tgts = tok.encode_batch([s for s, _ in pairs]), tok.encode_batch([t for _, t in pairs])
    for s, t in zip(srcs, tgts):
        s, t = _strip_eos(list(s), cfg.eos_id), _strip_eos(list(t), cfg.eos_id)
        s = s[:cfg.block_size - 1] + [cfg.eos_id]
        t = t[:cfg.block_size] if cfg.masked else t[:cfg.block_size - 1] + [cfg.eos_id]
        out.append((s, t))
    return out


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(batch: list[tuple[list[int], list[int]]], cfg: PairConfig, rng: np.random.Generator | None = None
            ) -> dict[str, torch.Tensor]:
    """Model keyword arguments for a list of encoded pairs (`rng` draws the cmlm masks)."""
    src = _pad([s for s, _ in batch], cfg.pad_id)
    out = {"input_ids": src, "attention_mask": (src != cfg.pad_id).long()}
    if not cfg.masked:
        out["targets"] = _pad([t for _, t in batch], -100)
        return out
    rng = rng if rng is not None else np.random.default_rng()
    dec = _pad([t for _, t in batch], cfg.pad_id)
    targets = torch.full_like(dec, -100)
    for r, (_, t) in enumerate(batch):
        n = int(rng.integers(1, len(t) + 1))  # how many to mask: uniform over 1 .. len
        where = torch.from_numpy(rng.choice(len(t), size=n, replace=False))
        targets[r, where] = dec[r, where]
        dec[r, where] = cfg.mask_id
    out.update(decoder_input_ids=dec, targets=targets,
               target_lengths=torch.tensor([len(t) for _, t in batch], dtype=torch.long))
    return out


class PairBatches:
    """Random batches of encoded pairs (a resumable sampler, like lmlab/data/stream.py's)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], cfg: PairConfig, batch_size: int, seed: int = 0):
        if not pairs:
            raise LmlabError("no pairs to sample from")
        self.pairs, self.cfg, self.batch_size, self.seed = pairs, cfg, batch_size, seed
        self.step = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step, 3])  # 3: a stream apart from other samplers'
        self.step += 1
        picks = rng.integers(0, len(self.pairs), size=self.batch_size)
        return collate([self.pairs[i] for i in picks], self.cfg, rng)

    def state_dict(self) -> dict:
        return {"kind": "cmlm" if self.cfg.masked else "seq2seq", "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
