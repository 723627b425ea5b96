"""Scaling plots (PNG): loss against compute with its frontier, IsoFLOP profiles, loss against tokens
per model size, and the train-longer curve — each with the fitted law drawn over the measured runs.

matplotlib is imported lazily with the Agg backend, so plotting works without a display.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lmlab.scaling.fit import ISOFLOP_TOLERANCE, ChinchillaLaw, KaplanLaw
from lmlab.utils.atomic import atomic_open

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, note: str = "") -> Path:
    """Write fig as PNG; a `note` (e.g. the fit is not identified) is printed in red under the axes."""
    from matplotlib.ticker import NullFormatter

    if note:
        import textwrap

        fig.text(0.5, -0.02, textwrap.fill(note, 90), ha="center", va="top", color="red", fontsize=7)

    for ax in fig.axes:  # label decades only: minor-tick labels on short log axes overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _columns(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([r["N"] for r in runs], float), np.array([r["D"] for r in runs], float),
            np.array([r["val_loss"] for r in runs], float))


def loss_vs_compute(runs: list[dict], law: ChinchillaLaw, path: Path, note: str = "") -> Path:
    """Every run at C = 6ND, coloured by size; the measured frontier and the law's compute-optimal loss."""
    plt = _pyplot()
    N, D, L = _columns(runs)
    C = 6 * N * D
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in np.unique(N):
        m = N == n
        order = np.argsort(C[m])
        ax.plot(C[m][order], L[m][order], "o-", alpha=0.7, label=f"N={n:.3g}")
    order = np.argsort(C)
    frontier = np.minimum.accumulate(L[order])
    ax.step(C[order], frontier, where="post", color="black", lw=1, label="measured frontier")
    grid = np.geomspace(C.min() / 2, C.max() * 8, 100)
    n_opt, d_opt = law.compute_optimal(grid)
    ax.plot(grid, law.loss(n_opt, d_opt), "--", color="gray",
            label="fit: L(N*(C), D*(C))" + (" (not identified)" if note else ""))
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss (nats/token)",
           title="Loss against compute")
    ax.legend(fontsize=7)
    return _save(fig, path, note)


def isoflop_profiles(runs: list[dict], law: ChinchillaLaw, path: Path, *,
                     rel_tol: float = ISOFLOP_TOLERANCE, note: str = "") -> Path:
    """Runs grouped by compute budget (within rel_tol), loss against N; the law's curve at each budget."""
    plt = _pyplot()
    N, D, L = _columns(runs)
    C = 6 * N * D
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets: list[float] = []
    for c in np.sort(C):
        if not budgets or c > budgets[-1] * (1 + rel_tol):
            budgets.append(float(c))
    for c in budgets:
        m = np.abs(C / c - 1) <= rel_tol
        if m.sum() < 2:
            continue
        order = np.argsort(N[m])
        line, = ax.plot(N[m][order], L[m][order], "o", label=f"C={c:.2g}")
        ns = np.geomspace(N[m].min() / 2, N[m].max() * 2, 60)
        ax.plot(ns, law.loss(ns, c / (6 * ns)), "-", color=line.get_color(), alpha=0.5)
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss",
           title="IsoFLOP profiles (points: runs; lines: fit)")
    ax.legend(fontsize=7)
    return _save(fig, path, note)


def loss_vs_tokens(runs: list[dict], law: ChinchillaLaw, path: Path, extra: list[dict] | None = None,
                   kaplan: KaplanLaw | None = None, note: str = "") -> Path:
    """Loss against training tokens, one line per model size, with the Chinchilla law (solid) and
    Kaplan's L(N, D) (dashed, if given); `extra` runs (held-out) starred."""
    plt = _pyplot()
    N, D, L = _columns(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    ds = np.geomspace(D.min() / 2, D.max() * 4, 60)
    for n in np.unique(N):
        m = N == n
        line, = ax.plot(D[m], L[m], "o", label=f"N={n:.3g}")
        ax.plot(ds, law.loss(n, ds), "-", color=line.get_color(), alpha=0.5)
        if kaplan is not None:
            ax.plot(ds, kaplan.loss(n, ds), "--", color=line.get_color(), alpha=0.5)
    for r in extra or []:
        line, = ax.plot([r["D"]], [r["val_loss"]], "*", ms=12, label=f"held out N={r['N']:.3g}")
        ax.plot(ds, (kaplan or law).loss(r["N"], ds), ":", color=line.get_color())
    title = "Loss against tokens (points: runs; lines: Chinchilla fit"
    ax.set(xscale="log", xlabel="training tokens D", ylabel="validation loss",
           title=title + ("; dashed: Kaplan)" if kaplan is not None else ")"))
    ax.legend(fontsize=7)
    return _save(fig, path, note)


def train_longer(rows: list[dict], law: ChinchillaLaw | None, path: Path) -> Path:
    """Fixed N, growing D: measured final losses (each its own run) and the law's prediction."""
    plt = _pyplot()
    D = np.array([r["D"] for r in rows], float)
    L = np.array([r["val_loss"] for r in rows], float)
    fig, ax = plt.subplots(figsize=(6, 4))
    order = np.argsort(D)
    ax.plot(D[order], L[order], "o-", label="measured (one run per budget)")
    if law is not None:
        ds = np.geomspace(D.min() / 1.5, D.max() * 1.5, 60)
        ax.plot(ds, law.loss(rows[0]["N"], ds), "--", color="gray", label="fitted law")
    ax.set(xscale="log", xlabel="training tokens D", ylabel="validation loss",
           title=f"Train longer at N={rows[0]['N']:.3g}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_sweep_plots(runs: list[dict], law: ChinchillaLaw, out_dir: Path,
                      extra: list[dict] | None = None, kaplan: KaplanLaw | None = None,
                      note: str = "") -> list[Path]:
    """The three sweep plots into out_dir; [] with a message if matplotlib is missing. `note` (e.g.
    "Chinchilla law NOT IDENTIFIED: ...") is printed on each."""
    try:
        _pyplot()
    except ImportError:
        log.warning("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [loss_vs_compute(runs, law, out_dir / "loss_vs_compute.png", note),
            isoflop_profiles(runs, law, out_dir / "isoflop.png", note=note),
            loss_vs_tokens(runs, law, out_dir / "loss_vs_tokens.png", extra, kaplan, note)]
