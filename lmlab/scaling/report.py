"""`lmlab scaling fit` and `lmlab scaling predict`: fit the laws to a sweep's results, predict a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.scaling.fit import (
    ChinchillaLaw,
    KaplanLaw,
    bootstrap,
    fit_chinchilla,
    fit_kaplan,
    fit_power_law,
    identification,
    interval,
    isoflop_optima,
)
from lmlab.utils.atomic import atomic_write_text

# law name -> (class, full fit, the cheaper fit used for bootstrap resamples)
LAWS = {
    "chinchilla": (ChinchillaLaw, fit_chinchilla, lambda n, d, loss: fit_chinchilla(n, d, loss, starts=8)),
    "kaplan": (KaplanLaw, fit_kaplan, lambda n, d, loss: fit_kaplan(n, d, loss, starts=4)),
}


def load_results(path: str | Path) -> list[dict]:
    p = Path(path)
    file = p / "results.json" if p.is_dir() else p
    if not file.is_file():
        raise LmlabError(f"no sweep results at {p} (expected results.json from `lmlab scaling sweep`)")
    runs = json.loads(file.read_text(encoding="utf-8"))
    if len(runs) < 5:
        raise LmlabError(f"{file} holds {len(runs)} runs; a fit needs at least 5")
    return runs


def fit_results(runs: list[dict], *, n_bootstrap: int = 100, seed: int = 0, force: bool = False) -> dict:
    """Fit the laws, bootstrap them and check that the Chinchilla law is identified
    (`fit.identification`). The compute-optimal allocation of a law that is not identified is refused
    (written as {"refused": why}) unless `force`, and is then marked forced."""
    N = np.array([r["N"] for r in runs], dtype=float)
    D = np.array([r["D"] for r in runs], dtype=float)
    L = np.array([r["val_loss"] for r in runs], dtype=float)
    law = fit_chinchilla(N, D, L)
    boots = bootstrap(LAWS["chinchilla"][2], [N, D, L], n=n_bootstrap, seed=seed)
    ident = identification(law, boots)
    out: dict = {"chinchilla": law.as_dict(), "n_runs": len(runs), "identification": ident,
                 "bootstrap": [b.as_dict() for b in boots],
                 "bootstrap_failed": {"count": boots.failed, "of": n_bootstrap, "errors": boots.errors},
                 "intervals_90": {k: interval([b.as_dict()[k] for b in boots]) for k in law.as_dict()}}
    kaplan = fit_kaplan(N, D, L)
    out["kaplan"] = kaplan.as_dict()
    kboots = bootstrap(LAWS["kaplan"][2], [N, D, L], n=n_bootstrap, seed=seed)
    out["kaplan_bootstrap"] = [b.as_dict() for b in kboots]
    out["kaplan_bootstrap_failed"] = {"count": kboots.failed, "of": n_bootstrap, "errors": kboots.errors}
    out["kaplan_max_abs_residual"] = float(np.max(np.abs(kaplan.loss(N, D) / L - 1)))
    C = 6 * N * D
    # Kaplan et al. 2020 style one-variable laws over the frontier: the best loss at each N, D and C
    for name, X in (("L_of_N", N), ("L_of_D", D), ("L_of_C", C)):
        xs = np.unique(X)
        best = np.array([L[X == x].min() for x in xs])
        if len(xs) >= 3:
            out[name] = fit_power_law(xs, best).as_dict()
    try:
        iso = isoflop_optima(N, D, L)
        out["isoflop"] = {"n_exponent": iso.n_exponent, "d_exponent": iso.d_exponent,
                          "budgets": iso.budgets, "n_opt": iso.n_opt}
    except ValueError as e:
        out["isoflop"] = {"skipped": str(e)}
    out["residuals"] = [{"name": r.get("name", ""), "N": r["N"], "D": r["D"], "val_loss": r["val_loss"],
                         "fitted": float(law.loss(r["N"], r["D"]))} for r in runs]
    out["max_abs_residual"] = max(abs(r["fitted"] - r["val_loss"]) / r["val_loss"] for r in out["residuals"])
    out["backtest"] = backtest(runs)
    if ident["identified"] or force:
        budgets = np.geomspace(C.min(), C.max() * 100, 5)
        n_opt, d_opt = law.compute_optimal(budgets)
        out["compute_optimal"] = [{"C": float(c), "N": float(n), "D": float(d), "tokens_per_param": float(d / n)}
                                  | ({"forced": ident["reason"]} if not ident["identified"] else {})
                                  for c, n, d in zip(budgets, n_opt, d_opt)]
    else:
        out["compute_optimal"] = {"refused": "the Chinchilla law is " + ident["reason"] +
                                  "; pass --force to compute it anyway"}
    return out


def refusal(fit: dict) -> str:
    """Why a fit must not be used for allocations ("" when it may): its own identification record, or,
    for a fit.json written before the check, the bounds of its Chinchilla law alone."""
    ident = fit.get("identification")
    if ident is None and "chinchilla" in fit:
        boots = [ChinchillaLaw(**b) for b in fit.get("bootstrap", [])]
        ident = identification(ChinchillaLaw(**fit["chinchilla"]), boots)
    return "" if ident is None or ident["identified"] else "the Chinchilla law is " + ident["reason"]


def backtest(runs: list[dict], laws: tuple[str, ...] = ("chinchilla", "kaplan")) -> list[dict]:
    """Can this sweep predict a run it did not see? Refit each law without the largest N, without the
    largest D, without both, and without the runs above a quarter of the largest compute, and score the
    left-out runs. Leaving out the corner (largest N and D) is a 2x N, 2x D extrapolation on a doubling
    grid, i.e. the held-out test at 4x compute, for free; on a grid capped by max_compute, the runs above
    C_max / 4 play that part. A sweep that fails here will not predict its held-out run either. A refit
    needs three distinct values of N and of D (with two, E and B / D^beta trade off freely)."""
    N = np.array([r["N"] for r in runs], dtype=float)
    D = np.array([r["D"] for r in runs], dtype=float)
    L = np.array([r["val_loss"] for r in runs], dtype=float)
    C = 6 * N * D
    rows = []
    for name, held in (("largest N", N == N.max()), ("largest D", D == D.max()),
                       ("largest N and D", (N == N.max()) & (D == D.max())),
                       ("C above C_max / 4", C > C.max() / 4)):
        train = ~held if name != "largest N and D" else (N < N.max()) & (D < D.max())
        if train.sum() < 5 or not held.any() or min(len(set(N[train])), len(set(D[train]))) < 3:
            continue
        for law_name in laws:
            law = LAWS[law_name][1](N[train], D[train], L[train])
            for i in np.flatnonzero(held):
                pred = float(law.loss(N[i], D[i]))
                rows.append({"law": law_name, "left_out": name, "fitted_runs": int(train.sum()),
                             "name": runs[i].get("name", ""), "N": float(N[i]), "D": float(D[i]),
                             "val_loss": float(L[i]), "predicted": pred, "error": (pred - L[i]) / L[i]})
    return rows


def predict(fit: dict, n: float, d: float, law: str = "chinchilla") -> dict:
    if law not in LAWS:
        raise LmlabError(f"unknown law '{law}'; choose one of {', '.join(LAWS)}")
    if law not in fit:
        raise LmlabError(f"this fit has no '{law}' law; refit the sweep with `lmlab scaling fit`")
    cls = LAWS[law][0]
    boots_key = "bootstrap" if law == "chinchilla" else f"{law}_bootstrap"
    boots = [float(cls(**b).loss(n, d)) for b in fit.get(boots_key, [])]
    lo, hi = interval(boots) if boots else (float("nan"), float("nan"))
    return {"law": law, "N": n, "D": d, "C": 6 * n * d, "loss": float(cls(**fit[law]).loss(n, d)),
            "interval_90": [lo, hi]}


def write_fit(fit: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(fit, indent=2))


def _fmt(v: float) -> str:
    return f"{v:.4g}" if v == v else "n/a"


def summary(fit: dict) -> str:
    c = fit["chinchilla"]
    ident = fit.get("identification", {})
    lines = [f"L(N, D) = {c['E']:.4g} + {c['A']:.4g} / N^{c['alpha']:.3f} + {c['B']:.4g} / D^{c['beta']:.3f}"
             f"   ({fit['n_runs']} runs)"]
    if ident and not ident["identified"]:
        lines.append("NOT IDENTIFIED: " + ident["reason"])
    for k, (lo, hi) in fit["intervals_90"].items():
        pin = ident.get("pinned", {}).get(k)
        share = ident.get("pinned_share", {}).get(k, 0.0)
        note = (f"   fit on the {pin}" if pin else "") + (f"   {share:.0%} of refits on a bound" if share else "")
        lines.append(f"  {k:<6} 90% interval [{_fmt(lo)}, {_fmt(hi)}]{note}")
    failed = fit.get("bootstrap_failed")
    if failed:
        lines.append(f"  bootstrap: {failed['count']} of {failed['of']} refits failed"
                     + (f" ({'; '.join(failed['errors'][:2])})" if failed["errors"] else ""))
    for name in ("L_of_N", "L_of_D", "L_of_C"):
        if name in fit:
            p = fit[name]
            pins = p.get("pinned") or {}
            flag = ("   AT THE CONSTRAINT: " + ", ".join(f"{k} on its {v}" for k, v in pins.items())) if pins else ""
            lines.append(f"{name}: {p['E']:.3f} + ({p['X_c']:.3g} / X)^{p['alpha']:.3f}{flag}")
    co = fit["compute_optimal"]
    if isinstance(co, dict):
        lines.append("compute-optimal allocation: refused, " + co["refused"])
    else:
        lines.append("compute-optimal allocation (C = 6ND)"
                     + (", FORCED from a law that is not identified:" if co and "forced" in co[0] else ":"))
        for row in co:
            lines.append(f"  C={row['C']:.3g}: N*={row['N']:.3g}, D*={row['D']:.3g}, "
                         f"{row['tokens_per_param']:.1f} tokens/param")
    if "max_abs_residual" in fit:
        lines.append(f"largest in-sample residual: {fit['max_abs_residual']:.2%} of the loss")
    if "kaplan" in fit:
        b = fit["kaplan"]
        lines.append(f"Kaplan's L(N, D) = [({b['N_c']:.4g} / N)^({b['alpha_N']:.4f} / {b['alpha_D']:.4f}) + "
                     f"{b['D_c']:.4g} / D]^{b['alpha_D']:.4f}, largest in-sample residual "
                     f"{fit['kaplan_max_abs_residual']:.2%}")
        kf = fit.get("kaplan_bootstrap_failed")
        if kf and kf["count"]:
            lines.append(f"  Kaplan bootstrap: {kf['count']} of {kf['of']} refits failed")
    if fit.get("backtest"):
        lines.append("backtest (refit without the left-out runs, then predict them):")
        for r in fit["backtest"]:
            run = r["name"] or f"N={r['N']:.3g} D={r['D']:.3g}"
            lines.append(f"  {r.get('law', 'chinchilla'):<12} without {r['left_out']:<16} {run}: measured "
                         f"{r['val_loss']:.4f}, predicted {r['predicted']:.4f} ({r['error']:+.2%})")
    return "\n".join(lines)
