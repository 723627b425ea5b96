"""Zero-, one- and few-shot evaluation (Brown et al. 2020): k solved demonstrations, then the question.

For each test item and each k, the demonstrations are drawn from the task's pool (never its test
items) by a sampler seeded with (seed, task, item, k), so a run is reproducible and every model sees
the same prompts. Multiple-choice tasks report `acc` (the choice of highest summed log-likelihood)
and `acc_norm` (per character of the choice, lm-eval's normalisation); generation tasks report exact
match of the greedy answer cut at the task's stop string. Accuracies come with their binomial
standard error sqrt(p (1 - p) / n). All requests of one (task, k) go to the model in one call, so it
can batch them.

A full run is hours on a CPU, so `evaluate_model` stores each finished (model, task, k) cell in a
`CellCache` (one JSON file per cell, written atomically) and a rerun takes finished cells from it:
an interrupted run continues where it stopped, and a model whose cells are all done is not loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.eval.harness.lm import LM, GenArgs, cut_at_stop
from lmlab.eval.tasks import Item, Task
from lmlab.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def demonstrations(task: Task, index: int, k: int, seed: int) -> list[Item]:
    """The k demonstrations for test item `index`: a seeded sample of the pool."""
    if k > len(task.pool):
        raise LmlabError(f"task {task.name}: {k} shots need a pool of at least {k} items (it has {len(task.pool)})")
    return random.Random(f"{seed}/{task.name}/{index}/{k}").sample(task.pool, k)


def build_prompt(task: Task, item: Item, demos: list[Item]) -> str:
    shown = [d.context + task.target_delimiter + d.answer for d in demos]
    return task.description + task.separator.join(shown + [item.context])


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


WILSON_Z = 1.959964  # two-sided 95%: the normal quantile Phi^-1(0.975)


def wilson(p: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p of n (Wilson 1927; Brown, Cai & DasGupta 2001,
    eq. 4): centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    Unlike p ± stderr it is not degenerate at p = 0 or 1 (0 of 200: [0, 1.9%])."""
    if not n:
        return float("nan"), float("nan")
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def mcnemar_p(a: Sequence[int], b: Sequence[int]) -> float:
    """Exact two-sided McNemar test of two systems' right (1) / wrong (0) answers on the same items: a
    binomial test with p = 1/2 on the items where exactly one of them is right (McNemar 1947)."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar_p: {len(a)} and {len(b)} answers are not paired")
    n01 = sum(not x and bool(y) for x, y in zip(a, b, strict=True))
    n10 = sum(bool(x) and not y for x, y in zip(a, b, strict=True))
    n = n01 + n10
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(n01, n10) + 1)) / 2 ** n)


@dataclass
class ShotResult:
    task: str
    kind: str
    shots: int
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    seconds: float = 0.0
    distinct: int = 0                                  # distinct test questions (tasks with few repeat some)
    items: list[dict] = field(default_factory=list)   # per item: prompt, scores or prediction, correct

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "items"}
        out["acc_interval_95"] = list(wilson(self.acc, self.n))  # Wilson score interval
        return out


def evaluate_task(lm: LM, task: Task, shots: int, seed: int = 0) -> ShotResult:
    t0 = time.perf_counter()
    prompts = [build_prompt(task, it, demonstrations(task, i, shots, seed)) for i, it in enumerate(task.items)]
    n = len(task.items)
    if task.kind == "multiple_choice":
        requests = [(p, task.target_delimiter + c) for p, it in zip(prompts, task.items) for c in it.choices]
        scores = lm.loglikelihood(requests)
        items, hits, hits_norm, at = [], 0, 0, 0
        for p, it in zip(prompts, task.items):
            ll = np.array([s for s, _ in scores[at:at + len(it.choices)]])
            at += len(it.choices)
            lengths = np.array([len(c) for c in it.choices], dtype=np.float64)
            pick, pick_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
            hits, hits_norm = hits + (pick == it.gold), hits_norm + (pick_norm == it.gold)
            items.append({"prompt": p, "choices": list(it.choices), "gold": it.gold, "loglikelihoods": ll.tolist(),
                          "pred": pick, "pred_norm": pick_norm})
        acc, acc_norm = hits / n, hits_norm / n
        return ShotResult(task.name, task.kind, shots, n, acc, stderr(acc, n), acc_norm, stderr(acc_norm, n),
                          time.perf_counter() - t0, _distinct(task), items)
    args = GenArgs(until=tuple(task.stop), max_new_tokens=task.max_new_tokens)
    # cut again here: an LM may return its text uncut (e.g. one answering through another harness)
    outputs = [cut_at_stop(o, task.stop)[0] for o in lm.generate_until([(p, args) for p in prompts])]
    items = [{"prompt": p, "target": it.target, "output": o, "correct": o.strip() == it.target.strip()}
             for p, it, o in zip(prompts, task.items, outputs)]
    acc = sum(x["correct"] for x in items) / n
    return ShotResult(task.name, task.kind, shots, n, acc, stderr(acc, n), seconds=time.perf_counter() - t0,
                      distinct=_distinct(task), items=items)


def _distinct(task: Task) -> int:
    return len({it.context for it in task.items})


def evaluate(lm: LM, tasks: list[Task], shots: list[int], seed: int = 0) -> list[ShotResult]:
    """Every task at every k."""
    out = []
    for task in tasks:
        for k in shots:
            r = evaluate_task(lm, task, k, seed)
            _log_result(lm.name, r)
            out.append(r)
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".arpa", ".json", ".yaml", ".model", ".txt")


def weights_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) over a model's files: the file itself, or every weight, config and
    tokenizer file under a directory (names and contents). A hub name that is not a local path
    digests to "" (its revision is not known here)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES) \
        if p.is_dir() else []
    if not files:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def code_version() -> str:
    """lmlab's version and, in a git checkout, its commit (with "+dirty" for uncommitted changes)."""
    import subprocess

    import lmlab

    root = Path(lmlab.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return lmlab.__version__ + (f"+{head}" if head else "")


class CellCache:
    """Finished cells under `root`, one `<model>__<task>__<k>shot-<hash>.json` each. A cell counts
    only if everything that decides its numbers matches: model name and path, the weights' digest
    (`weights_digest`), the code version (`code_version`), k, `key` (seed, dtype, ...) and the task
    itself (a digest of its items, pool and prompt settings, so an edited task file
    is evaluated again); otherwise it is computed again and overwritten."""

    def __init__(self, root: str | Path, key: dict):
        self.root, self.key = Path(root), key
        self._weights: dict[str, str] = {}

    def _ident(self, model: str, path: str, task: Task, shots: int) -> dict:
        digest = hashlib.sha1(repr(task).encode()).hexdigest()
        if path not in self._weights:
            self._weights[path] = weights_digest(path)
        return {"model": model, "path": path, "weights": self._weights[path], "code": code_version(),
                "task": task.name, "task_digest": digest, "shots": shots, **self.key}

    def path(self, model: str, path: str, task: Task, shots: int) -> Path:
        ident = json.dumps(self._ident(model, path, task, shots), sort_keys=True)
        slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{model}__{task.name}")[:80]
        return self.root / f"{slug}__{shots}shot-{hashlib.sha1(ident.encode()).hexdigest()[:10]}.json"

    def get(self, model: str, path: str, task: Task, shots: int) -> dict | None:
        """The stored cell ({"ident", "row", "items"}), or None."""
        f = self.path(model, path, task, shots)
        try:
            cell = json.loads(f.read_text())
        except (OSError, ValueError):  # missing, or unreadable: compute it again
            return None
        return cell if cell.get("ident") == self._ident(model, path, task, shots) else None

    def put(self, model: str, path: str, task: Task, shots: int, row: dict, items: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cell = {"ident": self._ident(model, path, task, shots), "row": row, "items": items}
        atomic_write_text(self.path(model, path, task, shots), json.dumps(cell) + "\n")


def evaluate_model(load: Callable[[], LM], name: str, path: str, tasks: list[Task], shots: list[int],
                   seed: int = 0, *, cache: CellCache | None = None, extra: dict | None = None) -> list[dict]:
    """Result rows (ShotResult.summary() with model, path, params and `extra`) of one model on every
    task at every k. `load` is called at the first cell not in `cache`, so a finished model is never
    loaded; each computed cell goes into `cache` as soon as it is done."""
    lm: LM | None = None
    rows = []
    for task in tasks:
        for k in shots:
            cell = cache.get(name, path, task, k) if cache is not None else None
            if cell is not None:
                rows.append(cell["row"])
                log.info(f"{name} {task.name} {k}-shot: done before (acc {cell['row']['acc']:.3f})")
                continue
            if lm is None:
                t0 = time.perf_counter()
                lm = load()
                lm.name = name
                log.info(f"loaded {path} as {name} ({time.perf_counter() - t0:.1f}s)")
            r = evaluate_task(lm, task, k, seed)
            _log_result(lm.name, r)
            row = {"model": name, "path": path, "params": lm.params, **(extra or {}), **r.summary()}
            if cache is not None:
                cache.put(name, path, task, k, row, r.items)
            rows.append(row)
    return rows


def _log_result(name: str, r: ShotResult) -> None:
    norm = f", acc_norm {r.acc_norm:.3f}" if r.acc_norm is not None else ""
    lo, hi = wilson(r.acc, r.n)
    log.info(f"{name} {r.task} {r.shots}-shot: acc {r.acc:.3f} [95% {lo:.3f}, {hi:.3f}]{norm} "
             f"(n={r.n}, {r.seconds:.1f}s)")


def run_fewshot(models: list[str], tasks: list[str], shots: list[int], *, items: int = 200, seed: int = 0,
                out: str | Path = "runs/fewshot", batch_size: int = 16, bf16: bool = False,
                words_file: str | None = None, device: str = "cpu", names: list[str] | None = None) -> list[dict]:
    """Evaluate every model on every task at every k; write results.json, results.md and plots to `out`.
    Finished cells are kept in `out/cells/`: a rerun with the same settings skips them."""
    import torch

    from lmlab.eval.harness import lm as lm_module
    from lmlab.eval.harness.report import write_results
    from lmlab.eval.tasks import expand, load_task

    if items < 1:
        raise LmlabError("--items must be at least 1")
    task_list = [load_task(t, items, seed, words_file=words_file) for t in expand(tasks)]
    key = {"items": items, "seed": seed, "bf16": bf16, "words_file": words_file}  # what decides the numbers
    cache = CellCache(Path(out) / "cells", key)
    rows: list[dict] = []
    for i, path in enumerate(models):
        name = names[i] if names and i < len(names) else Path(path).name  # load_lm's default name

        def load(path=path):
            return lm_module.load_lm(path, batch_size=batch_size, dtype=torch.bfloat16 if bf16 else None,
                                     device=device)

        rows += evaluate_model(load, name, str(path), task_list, shots, seed, cache=cache)
    config = {"models": [str(m) for m in models], "tasks": [t.name for t in task_list], "shots": shots,
              "items": items, "seed": seed, "bf16": bf16}
    for p in write_results(out, rows, config):
        log.info(f"wrote {p}")
    return rows
