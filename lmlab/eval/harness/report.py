"""Few-shot results on disk: results.json (every number), results.md (tables), accuracy plots.

One row per (model, task, k): accuracy with its standard error (and acc_norm for multiple choice).
The plots show accuracy against k per task, and, when several neural models are given, accuracy
against model size (parameters, log scale) per k, GPT-3's Figure 1.2 / 3.10 shape. matplotlib is
optional: without it the plots are skipped with a message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmlab.eval.harness.fewshot import wilson
from lmlab.utils.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def write_results(out: str | Path, rows: list[dict], config: dict) -> list[Path]:
    """`rows`: ShotResult.summary() dicts with `model` and `params` added."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    atomic_write_text(written[0], json.dumps({"config": config, "results": rows}, indent=2) + "\n")
    atomic_write_text(written[1], markdown(rows, config))
    written += plot(rows, out)
    return written


def _cell(r: dict) -> str:
    lo, hi = r.get("acc_interval_95") or wilson(r["acc"], r["n"])
    s = f"{100 * r['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    if r.get("acc_norm") is not None:
        s += f" (norm {100 * r['acc_norm']:.1f})"
    return s


def markdown(rows: list[dict], config: dict) -> str:
    shots = sorted({r["shots"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = ["# Few-shot accuracy", "",
             f"Accuracy in % [Wilson 95% interval]; {config.get('items')} seeded items per task and k "
             f"(seed {config.get('seed')}); multiple-choice tasks also show the length-normalised accuracy.", ""]
    for task in tasks:
        sub = {(r["model"], r["shots"]): r for r in rows if r["task"] == task}
        if not sub:
            continue
        any_row = next(iter(sub.values()))
        distinct = any_row.get("distinct") or any_row["n"]
        size = f"n={any_row['n']}" + (f", {distinct} distinct" if distinct < any_row["n"] else "")
        lines += [f"## {task} ({any_row['kind'].replace('_', ' ')}, {size})", "",
                  "| model | " + " | ".join(f"{k}-shot" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        for m in models:
            if any((m, k) in sub for k in shots):
                lines.append(f"| {m} | " + " | ".join(_cell(sub[m, k]) if (m, k) in sub else "" for k in shots) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return []
    import io
    import math

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    written = []
    cols = min(4, len(tasks))
    fig, axes = plt.subplots(math.ceil(len(tasks) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(tasks) / cols)),
                             squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m in models:
            pts = sorted((r["shots"], r["acc"], *(r.get("acc_interval_95") or wilson(r["acc"], r["n"])))
                         for r in rows if r["task"] == task and r["model"] == m)
            if pts:  # Wilson 95% intervals (asymmetric; not degenerate at 0 or 1)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], marker="o",
                            capsize=3, label=m)
        ax.set_title(task)
        ax.set_xticks(shots)
        ax.set_xlabel("k (demonstrations)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:  # one legend for all panels: a model may be missing from some tasks
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=8)
    written.append(_save(fig, out / "accuracy_vs_shots.png", io))
    plt.close(fig)
    sized = [m for m in models if any(r["model"] == m and r.get("params") for r in rows)]
    if len(sized) > 1:  # mean accuracy over the tasks against parameters, one line per k
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k in shots:
            pts = []
            for m in sized:
                accs = [r["acc"] for r in rows if r["model"] == m and r["shots"] == k]
                params = next(r["params"] for r in rows if r["model"] == m)
                if accs:
                    pts.append((params, sum(accs) / len(accs)))
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{k}-shot")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"mean accuracy over {len(tasks)} tasks")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "accuracy_vs_size.png", io))
        plt.close(fig)
    return written


def _save(fig, path: Path, io) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path
