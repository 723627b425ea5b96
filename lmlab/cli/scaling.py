"""`lmlab scaling sweep | fit | predict | longer` (lmlab/scaling/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.cli._args import overrides
from lmlab.config import apply_overrides, describe
from lmlab.errors import LmlabError


def run(args: argparse.Namespace, rest: list[str]) -> int:
    if rest and args.action not in ("sweep", "longer"):
        raise LmlabError(f"unknown option '{rest[0]}' for lmlab scaling {args.action} "
                         "(config overrides are for sweep and longer; see lmlab scaling --help)")
    return {"sweep": _sweep, "fit": _fit, "predict": _predict, "longer": _longer}[args.action](args, rest)


def _sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.scaling.sweep import SweepConfig, sweep

    if args.path:
        raise LmlabError(f"unexpected argument '{args.path}': sweep is configured by --key=value options "
                         "(e.g. --out=runs/scaling)")
    cfg = apply_overrides(SweepConfig(), overrides(rest))
    sweep(cfg)
    print(f"results in {cfg.out}/results.md; fit them with `lmlab scaling fit {cfg.out}`")
    return 0


def _fit(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.scaling import report
    from lmlab.scaling.fit import ChinchillaLaw, KaplanLaw
    from lmlab.scaling.plots import write_sweep_plots

    if not args.path:
        raise LmlabError("give the sweep directory: lmlab scaling fit runs/scaling")
    fit = report.fit_results(report.load_results(args.path), n_bootstrap=args.bootstrap, force=args.force)
    out = Path(args.path) / "fit.json" if Path(args.path).is_dir() else Path(args.path).with_name("fit.json")
    report.write_fit(fit, out)
    print(report.summary(fit))
    ident = fit["identification"]
    note = "" if ident["identified"] else "Chinchilla law NOT IDENTIFIED: " + ", ".join(
        f"{k} {'on its ' + ident['pinned'][k] if k in ident['pinned'] else 'on a bound'}"
        f" in {ident['pinned_share'][k]:.0%} of refits" for k in ident["not_identified"])
    # held-out runs recorded beside the sweep (heldout*_results.json) are starred in loss_vs_tokens.png
    heldout = [r for f in sorted(out.parent.glob("heldout*_results.json")) for r in json.loads(f.read_text())]
    plots = write_sweep_plots(report.load_results(args.path), ChinchillaLaw(**fit["chinchilla"]), out.parent,
                              extra=heldout or None, kaplan=KaplanLaw(**fit["kaplan"]), note=note)
    print(f"wrote {out}" + "".join(f", {p}" for p in plots))
    return 0


def _read_fit(path: str | None, usage: str) -> dict:
    if not path:
        raise LmlabError(f"usage: {usage}")
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"fit file not found: {p}")
    return json.loads(p.read_text())


def _predict(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.scaling import report

    usage = "lmlab scaling predict FIT.json --n PARAMS --d TOKENS"
    if args.n is None or args.d is None:
        raise LmlabError(f"usage: {usage}")
    p = report.predict(_read_fit(args.path, usage), args.n, args.d, law=args.law)
    if args.law == "chinchilla" and (why := report.refusal(_read_fit(args.path, usage))):
        print(f"warning: {why}")
    print(f"predicted final validation loss for N={args.n:.3g}, D={args.d:.3g} (C={p['C']:.3g}): "
          f"{p['loss']:.4f}, 90% interval [{p['interval_90'][0]:.4f}, {p['interval_90'][1]:.4f}] ({args.law} law)")
    return 0


def _longer(args: argparse.Namespace, rest: list[str]) -> int:
    """One run per multiple of the compute-optimal budget of --n."""
    from lmlab.scaling.sweep import SweepConfig, train_longer_against_fit

    usage = "lmlab scaling longer FIT.json --n PARAMS [--multiples 1,2,4,8,16]"
    if args.n is None:
        raise LmlabError(f"usage: {usage}")
    fit = _read_fit(args.path, usage)
    from lmlab.scaling.report import refusal

    why = refusal(fit)
    if why and not args.force:
        raise LmlabError(f"refusing to size budgets from {args.path}: {why}. Pass --force to train anyway")
    if why:
        print(f"warning (--force): {why}")
    try:
        multiples = [float(m) for m in args.multiples.split(",")]
    except ValueError:
        raise LmlabError(f"--multiples must be numbers separated by commas, not '{args.multiples}'") from None
    cfg = apply_overrides(SweepConfig(out="runs/scaling-longer"), overrides(rest))
    _, table, written = train_longer_against_fit(cfg, fit, args.n, multiples)
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(add) -> None:
    from lmlab.scaling.sweep import SweepConfig

    sp = add("scaling", run, "Scaling laws: sweep model sizes x token budgets, fit the laws, predict a run.",
             "actions:\n  sweep    train the grid (resumable: finished runs are skipped, interrupted ones resumed)\n"
             "  fit      fit L(N, D) (Chinchilla Approach 3), L(N), L(D), L(C), IsoFLOP optima; bootstrap\n"
             "  predict  predicted loss with a 90% interval for a run not yet trained\n"
             "  longer   train longer: fixed --n, one run per multiple of its compute-optimal D\n\n"
             "sweep and longer options (defaults shown):\n" + "\n".join(describe(SweepConfig)) +
             "\n\nexamples:\n  lmlab prepare stdlib-code --out data/stdlib-code --vocab_size 1024\n"
             "  lmlab scaling sweep --workers=2          # the default grid, two 1-thread processes\n"
             "  lmlab scaling sweep --sizes=1e5,3e5,1e6 --tokens=2e6,4e6,8e6,16e6 --max_compute=0\n"
             "  lmlab scaling fit runs/scaling\n"
             "  lmlab scaling predict runs/scaling/fit.json --n 2e6 --d 3.2e7 --law kaplan",
             overrides=True)
    sp.add_argument("action", choices=["sweep", "fit", "predict", "longer"])
    sp.add_argument("path", nargs="?", help="fit: the sweep directory; predict, longer: its fit.json")
    sp.add_argument("--n", type=float, help="predict, longer: non-embedding parameters")
    sp.add_argument("--d", type=float, help="predict: training tokens")
    sp.add_argument("--bootstrap", type=int, default=100, help="fit: bootstrap resamples for intervals")
    sp.add_argument("--law", default="chinchilla", choices=("chinchilla", "kaplan"),
                    help="predict: which fitted law (kaplan: Kaplan et al. 2020 eq. 1.5)")
    sp.add_argument("--force", action="store_true",
                    help="fit, longer: compute-optimal allocations and budgets even from a law whose parameters "
                         "are not identified (pinned at a search bound)")
    sp.add_argument("--multiples", default="1,2,4,8,16",
                    help="longer: token budgets as multiples of the fit's compute-optimal D for --n")
