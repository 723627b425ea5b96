"""Image models on a prepared image split: a classifier's accuracy and confusion matrix (with a
picture of it), a captioner's exact-match and per-slot accuracy with greedy captions from the one
decode loop (lmlab/generate/engine.py)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmlab.data.images import ImageSplit


@dataclass
class ClassifierResult:
    n: int
    accuracy: float
    confusion: list[list[int]]   # rows: true class, columns: predicted
    labels: list[str]

    def as_dict(self) -> dict:
        per_class = [row[i] / max(sum(row), 1) for i, row in enumerate(self.confusion)]
        return {"n": self.n, "accuracy": self.accuracy, "per_class_accuracy": dict(zip(self.labels, per_class)),
                "confusion": self.confusion, "labels": self.labels}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, split: ImageSplit, batch_size: int = 256) -> ClassifierResult:
    """Accuracy and confusion matrix of a classifier on a split whose `batch(idx)` gives the model's
    keyword arguments and `labels` (images, or labelled texts: lmlab/data/classify.py)."""
    model.eval()
    k = model.config.n_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    for lo in range(0, len(split), batch_size):
        b = split.batch(np.arange(lo, min(lo + batch_size, len(split))))
        pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1).numpy()
        np.add.at(confusion, (b["labels"].numpy(), pred), 1)
    labels = list(model.config.labels) or [str(i) for i in range(k)]
    return ClassifierResult(len(split), float(np.trace(confusion) / max(confusion.sum(), 1)), confusion.tolist(),
                            labels)


def plot_confusion(res: ClassifierResult, path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG (counts in the cells, rows the true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.utils.atomic import atomic_write_bytes

    m = np.asarray(res.confusion)
    k = len(m)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1.0 + 0.45 * k), dpi=100)
    ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(k), res.labels, fontsize=7)
    ax.set_yticks(range(k), res.labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {res.accuracy:.1%} (n = {res.n})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def caption_images(model: nn.Module, tokenizer, pixel_values: torch.Tensor, *, max_new_tokens: int = 16,
                   batch_size: int = 256) -> list[str]:
    """Greedy captions of a batch of preprocessed images, through the one decode loop."""
    from lmlab.generate.engine import SamplingConfig, generate_texts

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    out: list[str] = []
    for lo in range(0, len(pixel_values), batch_size):
        px = pixel_values[lo:lo + batch_size]
        out += generate_texts(model, tokenizer, [[tokenizer.eos_id]] * len(px), cfg, inputs={"pixel_values": px})
    return [t.strip() for t in out]


def caption_scores(predicted: list[str], truth: list[dict[str, str]], parse) -> dict:
    """Exact match over whole captions and accuracy per slot (`parse`: caption -> slots or None)."""
    slots = list(truth[0]) if truth else []
    hits = {s: 0 for s in slots}
    exact = 0
    for text, want in zip(predicted, truth):
        got = parse(text) or {}
        exact += all(got.get(s) == want[s] for s in slots)
        for s in slots:
            hits[s] += got.get(s) == want[s]
    n = max(len(truth), 1)
    return {"n": len(truth), "exact_match": exact / n, "per_slot": {s: hits[s] / n for s in slots}}
