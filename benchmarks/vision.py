"""Vision acceptance runs (docs/vision/): ViT on scikit-learn's digits beside SVM and k-NN baselines,
and the shapes captioner on a held-out split with unseen colour-shape pairs.

    python benchmarks/vision.py digits     # prepare, tune on val, 5 seeds on test, baselines
    python benchmarks/vision.py captions   # prepare, train (resumable), caption the test split
    python benchmarks/vision.py report     # benchmarks/results/vision.{json,md} + docs/vision/*.png

Every stage records what it finished in benchmarks/runs/vision/state.json and skips it when run
again, and the captioner resumes from its last checkpoint, so an interrupted run picks up where it
stopped. Run it under `flock /tmp/lmlab-heavy.lock` on a shared machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from lmlab.config import apply_overrides  # noqa: E402
from lmlab.data.images import ImagePrepareConfig, ImageSplit, prepare_images  # noqa: E402
from lmlab.data.shapes import parse_caption  # noqa: E402
from lmlab.eval.images import caption_images, caption_scores, evaluate_classifier, plot_confusion  # noqa: E402
from lmlab.models.registry import preset  # noqa: E402
from lmlab.train.config import RunConfig  # noqa: E402
from lmlab.train.trainer import Trainer  # noqa: E402

WORK = Path(__file__).parent / "runs" / "vision"
DOCS = Path(__file__).parents[1] / "docs" / "vision"
SEEDS = (0, 1, 2, 3, 4)
THREADS = 1  # robust on a shared machine: 2 threads stall when another process takes a core

# ViT on 8x8 digits: candidates compared on the validation split (seed 0); the best is run on test
DIGITS_BASE = ["train.batch_size=128", "train.lr=3e-3", "train.min_lr=1e-5", "train.warmup_steps=50",
               "train.weight_decay=0.05", "train.beta2=0.99", "train.eval_interval=0", "train.eval_iters=1",
               "train.ckpt_interval=0", "train.progress=false", f"train.threads={THREADS}", "data.augment=1"]
DIGITS_CANDIDATES = {
    "patch2": ["train.max_steps=600"],
    "patch4": ["train.max_steps=800", "model.patch_size=4"],
    "patch4-mean": ["train.max_steps=800", "model.patch_size=4", "model.pool=mean"],
    "patch2-3000": ["train.max_steps=3000"],
    "patch4-3000": ["train.max_steps=3000", "model.patch_size=4"],
}
CAPTION_ARGS = ["train.batch_size=32", "train.lr=2e-3", "train.min_lr=1e-5", "train.warmup_steps=200",
                "train.weight_decay=0.05", "train.beta2=0.99", "train.eval_interval=1000", "train.eval_iters=4",
                "train.ckpt_interval=250", "train.progress=false", f"train.threads={THREADS}"]
CAPTION_STEPS = int(os.environ.get("VISION_CAPTION_STEPS", 2000))  # the 30-minute budget: ~12000

log = logging.getLogger("vision")


def _state() -> dict:
    f = WORK / "state.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _save(state: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = WORK / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(WORK / "state.json")


def _train(model: str, data: Path, out: Path, args: list[str], seed: int,
           resume: bool = False) -> tuple[Trainer, float]:
    cfg = RunConfig()
    cfg.model = preset(model)
    cfg.data.dir = str(data)
    cfg = apply_overrides(cfg, [*args, f"train.seed={seed}", f"train.out_dir={out}"])
    if out.exists() and not resume:
        shutil.rmtree(out)
    t0 = time.time()
    tr = Trainer(cfg, out, quiet=True)
    if resume:
        tr.resume()
    tr.fit()
    return tr, time.time() - t0


# ---------------------------------------------------------------------------------------------

def _pixels(split: ImageSplit) -> np.ndarray:
    return np.asarray(split.images, dtype=np.float32).reshape(len(split), -1) / 255


def baselines(splits: dict[str, ImageSplit]) -> dict:
    """scikit-learn's RBF SVM and k-NN on the raw pixels of the same split, each tuned on val."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    X = {s: _pixels(v) for s, v in splits.items()}
    y = {s: v.labels for s, v in splits.items()}
    out = {}
    for name, make, grid in (("svm_rbf", lambda v: SVC(C=v, gamma="scale"), (1, 3, 10, 30, 100)),
                             ("knn", lambda v: KNeighborsClassifier(n_neighbors=v), (1, 3, 5, 7, 9))):
        val = {v: float(make(v).fit(X["train"], y["train"]).score(X["val"], y["val"])) for v in grid}
        best = max(grid, key=lambda v: (val[v], -grid.index(v)))
        t0 = time.time()
        test = float(make(best).fit(X["train"], y["train"]).score(X["test"], y["test"]))
        out[name] = {"val_by_param": {str(k): v for k, v in val.items()}, "param": best, "test_accuracy": test,
                     "seconds": round(time.time() - t0, 2)}
        log.info(f"{name}: {best} -> test {test:.4f}")
    return out


def digits(state: dict) -> None:
    data = WORK / "digits"
    if not data.exists():
        prepare_images(ImagePrepareConfig(source="sklearn-digits", out=str(data), val_fraction=0.1,
                                          test_fraction=0.2, seed=1337))
    splits = {s: ImageSplit(data, s) for s in ("train", "val", "test")}
    d = state.setdefault("digits", {"split": {s: len(v) for s, v in splits.items()}})
    if "baselines" not in d:
        d["baselines"] = baselines(splits)
        _save(state)
    tune = d.setdefault("tune", {})
    for name, args in DIGITS_CANDIDATES.items():
        if name in tune:
            continue
        tr, secs = _train("vit-digits", data, WORK / f"digits-tune-{name}", DIGITS_BASE + args, seed=0)
        tune[name] = {"args": args, "val_accuracy": evaluate_classifier(tr.model, splits["val"]).accuracy,
                      "seconds": round(secs, 1)}
        log.info(f"tune {name}: {tune[name]}")
        _save(state)
    best = max(tune, key=lambda k: tune[k]["val_accuracy"])
    d["chosen"] = best
    if d.get("seeds_of") != best:  # seeds of an earlier choice do not count
        d["seeds"], d["seeds_of"] = {}, best
    runs = d.setdefault("seeds", {})
    for seed in SEEDS:
        if str(seed) in runs:
            continue
        tr, secs = _train("vit-digits", data, WORK / f"digits-seed{seed}", DIGITS_BASE + tune[best]["args"], seed=seed)
        res = evaluate_classifier(tr.model, splits["test"])
        runs[str(seed)] = {"test_accuracy": res.accuracy,
                           "val_accuracy": evaluate_classifier(tr.model, splits["val"]).accuracy,
                           "seconds": round(secs, 1), "params": tr.model.num_params(non_embedding=False)}
        if seed == SEEDS[0]:
            DOCS.mkdir(parents=True, exist_ok=True)
            plot_confusion(res, DOCS / "digits_confusion.png",
                           f"ViT on digits, seed {seed}: test accuracy {res.accuracy:.1%}")
        log.info(f"seed {seed}: {runs[str(seed)]}")
        _save(state)
    acc = [runs[str(s)]["test_accuracy"] for s in SEEDS]
    d["vit"] = {"mean": float(np.mean(acc)), "std": float(np.std(acc, ddof=1)), "min": min(acc), "max": max(acc),
                "max_seconds": max(runs[str(s)]["seconds"] for s in SEEDS)}
    _save(state)


# ---------------------------------------------------------------------------------------------

def captions(state: dict) -> None:
    data = WORK / "shapes"
    if not data.exists():
        prepare_images(ImagePrepareConfig(source="shapes-captions", out=str(data), n_train=20000, seed=1337))
    c = state.setdefault("captions", {})
    run = WORK / "captioner"
    if "train_seconds" not in c or c.get("steps", 0) < CAPTION_STEPS:
        tr, secs = _train("caption-shapes", data, run, CAPTION_ARGS + [f"train.max_steps={CAPTION_STEPS}"], seed=0,
                          resume=True)
        c["train_seconds"] = round(c.get("train_seconds", 0) + secs, 1)
        c["steps"], c["params"] = tr.step, tr.model.num_params(non_embedding=False)
        _save(state)
    from lmlab.io.load import load_model

    loaded = load_model(run)
    test = ImageSplit(data, "test")
    meta = test.meta["splits"]["test"]
    rows = [json.loads(x) for x in (data / meta["captions"]).read_text().splitlines()]
    t0 = time.time()
    pred = caption_images(loaded.model, loaded.tokenizer, test.preprocess.normalize(test.images[:]),
                          max_new_tokens=test.meta["max_tokens"] + 1)
    truth = [{k: v for k, v in r.items() if k != "caption"} for r in rows]
    n_seen = meta["n"] - meta["n_novel"]
    c["test"] = {"all": caption_scores(pred, truth, parse_caption),
                 "seen_pairs": caption_scores(pred[:n_seen], truth[:n_seen], parse_caption),
                 "novel_pairs": caption_scores(pred[n_seen:], truth[n_seen:], parse_caption),
                 "caption_seconds": round(time.time() - t0, 1)}
    c["examples"] = [{"truth": r["caption"], "generated": p} for r, p in zip(rows[::100], pred[::100])]
    _grid(test.images, rows, pred, n_seen)
    _save(state)
    log.info(json.dumps(c["test"], indent=1))


def _grid(images: np.ndarray, rows: list[dict], pred: list[str], n_seen: int, n: int = 12) -> None:
    """A grid of test pictures (half with unseen colour-shape pairs) with their generated captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = list(range(0, n_seen, n_seen // (n // 2)))[: n // 2] + \
        list(range(n_seen, len(rows), (len(rows) - n_seen) // (n // 2)))[: n // 2]
    fig, axes = plt.subplots(3, 4, figsize=(8.4, 7.2), dpi=72)
    for ax, i in zip(axes.flat, pick):
        ax.imshow(images[i], interpolation="nearest")
        ok = pred[i] == rows[i]["caption"]
        words = pred[i].split()
        text = " ".join(words[:4]) + "\n" + " ".join(words[4:])
        ax.set_title(("" if ok else "✗ ") + text + ("\n(unseen pair)" if i >= n_seen else "\n"), fontsize=8,
                     color="black" if ok else "red")
        ax.axis("off")
    fig.tight_layout()
    DOCS.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "captions_grid.png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def report(state: dict) -> None:
    d, c = state.get("digits", {}), state.get("captions", {})
    lines = ["# Vision: ViT on digits, shapes captioner", "",
             f"Machine: {machine()['platform']}, {machine()['cpus']} CPUs. Wall-clock timings were taken on a "
             "shared machine under load from other jobs (load average 4-8 on 2 cores; the digits seeds ran with 2 "
             "torch threads, the captioner with 1), so they are upper bounds of what an idle machine needs: the same "
             "digits run took 9 s alone and 190 s while another job held a core.", ""]
    if "vit" in d:
        b = d["baselines"]
        lines += ["## ViT on scikit-learn's digits (8x8)", "",
                  f"Stratified split (seed 1337): {d['split']['train']} train / {d['split']['val']} val / "
                  f"{d['split']['test']} test. Chosen on validation: `{d['chosen']}`.", "",
                  "| model | test accuracy | notes |", "|---|---|---|",
                  f"| ViT (`vit-digits`), mean of {len(SEEDS)} seeds | {d['vit']['mean']:.2%} ± "
                  f"{d['vit']['std']:.2%} | min {d['vit']['min']:.2%}, max {d['vit']['max']:.2%}; slowest seed "
                  f"{d['vit']['max_seconds']:.0f} s |",
                  f"| SVM (RBF), C={b['svm_rbf']['param']} | {b['svm_rbf']['test_accuracy']:.2%} | C tuned on val |",
                  f"| k-NN, k={b['knn']['param']} | {b['knn']['test_accuracy']:.2%} | k tuned on val |", "",
                  "Tuning (validation accuracy, seed 0):", "",
                  "| candidate | val accuracy | seconds |", "|---|---|---|"]
        lines += [f"| {k} `{' '.join(v['args'])}` | {v['val_accuracy']:.2%} | {v['seconds']:.0f} |"
                  for k, v in d["tune"].items()]
        lines += ["", "Per seed:", "", "| seed | val | test | seconds |", "|---|---|---|---|"]
        lines += [f"| {s} | {v['val_accuracy']:.2%} | {v['test_accuracy']:.2%} | {v['seconds']:.0f} |"
                  for s, v in d["seeds"].items()]
        lines += [""]
    if "test" in c:
        t = c["test"]
        lines += ["## Shapes captioner", "",
                  f"`caption-shapes` ({c['params'] / 1e6:.2f}M parameters), {c['steps']} steps in "
                  f"{c['train_seconds'] / 60:.1f} min. Test: {t['all']['n']} pictures, half with a colour-shape pair "
                  "never seen in training.", "",
                  "| test subset | n | exact match | colour | shape | relation | colour 2 | shape 2 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in ("all", "seen_pairs", "novel_pairs"):
            r = t[name]
            slots = " | ".join(f"{r['per_slot'][s]:.2%}" for s in ("colour", "shape", "relation", "colour2", "shape2"))
            lines.append(f"| {name} | {r['n']} | {r['exact_match']:.2%} | {slots} |")
        lines += [""]
    write_results("vision", {"machine": machine(), **state}, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["digits", "captions", "report"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(THREADS)
    state = _state()
    {"digits": digits, "captions": captions, "report": report}[args.stage](state)
    if args.stage == "captions":  # then any digits candidate or seed not run yet
        digits(_state())
    if args.stage != "report":
        report(_state())


if __name__ == "__main__":
    main()
