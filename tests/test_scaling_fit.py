import math

import numpy as np
import pytest

from lmlab.scaling.fit import (
    CHINCHILLA_APPROACH3,
    ChinchillaLaw,
    KaplanLaw,
    bootstrap,
    fit_chinchilla,
    fit_kaplan,
    fit_power_law,
    interval,
    isoflop_optima,
)


def test_chinchilla_approach3_compute_optimal_closed_form():
    C = 5.76e23  # Gopher's compute budget
    N, D = CHINCHILLA_APPROACH3.compute_optimal(C)
    assert N == pytest.approx(32.2e9, rel=0.01) and D == pytest.approx(2.98e12, rel=0.01)
    assert D / N == pytest.approx(92.6, rel=0.01)
    assert 6 * N * D == pytest.approx(C)
    # it is the minimum along the IsoFLOP curve
    for f in (0.8, 1.25):
        assert CHINCHILLA_APPROACH3.loss(N * f, C / (6 * N * f)) > CHINCHILLA_APPROACH3.loss(N, D)


def _synthetic(law, seed=0, noise=0.003):
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(2e5, 2e7, 6), 4)
    D = np.tile(np.geomspace(2e6, 2e8, 4), 6)
    L = law.loss(N, D) * np.exp(rng.normal(0, noise, len(N)))
    return N, D, L


def test_fit_recovers_known_coefficients_and_predicts():
    truth = ChinchillaLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.4)
    N, D, L = _synthetic(truth, noise=0.002)
    fit = fit_chinchilla(N, D, L)
    assert fit.E == pytest.approx(truth.E, rel=0.05)
    assert fit.alpha == pytest.approx(truth.alpha, rel=0.15) and fit.beta == pytest.approx(truth.beta, rel=0.15)
    # extrapolation to 4x the largest compute stays close
    assert fit.loss(4e7, 4e8) == pytest.approx(truth.loss(4e7, 4e8), rel=0.01)


def test_power_law_fits():
    X = np.geomspace(1e5, 1e8, 10)
    law = fit_power_law(X, 2.0 + (3e4 / X) ** 0.3)
    assert law.E == pytest.approx(2.0, rel=0.02) and law.alpha == pytest.approx(0.3, rel=0.05)
    kaplan = fit_power_law(X, (8.8e13 / X) ** 0.076, irreducible=False)  # Kaplan et al. 2020's L(N)
    assert kaplan.alpha == pytest.approx(0.076, rel=1e-6) and kaplan.X_c == pytest.approx(8.8e13, rel=1e-4)


def test_isoflop_approach2_matches_the_closed_form():
    law = ChinchillaLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.4)
    N, D = [], []
    for C in (1e15, 1e16, 1e17):
        n_star, _ = law.compute_optimal(C)
        for f in np.geomspace(0.25, 4, 7):
            N.append(n_star * f)
            D.append(C / (6 * n_star * f))
    res = isoflop_optima(N, D, law.loss(N, D))
    expected = law.beta / (law.alpha + law.beta)
    assert res.n_exponent == pytest.approx(expected, abs=0.03)
    assert res.n_exponent + res.d_exponent == pytest.approx(1.0, abs=1e-6)


def test_bootstrap_interval_covers_truth():
    X = np.geomspace(1e5, 1e8, 12)
    rng = np.random.default_rng(1)
    L = (3e4 / X) ** 0.3 * np.exp(rng.normal(0, 0.01, len(X)))
    fits = bootstrap(lambda x, y: fit_power_law(x, y, irreducible=False), [X, L], n=100)
    lo, hi = interval([f.alpha for f in fits])
    assert lo < 0.3 < hi and hi - lo < 0.05


def test_backtest_passes_on_a_law_and_catches_a_sweep_the_law_cannot_describe():
    from lmlab.scaling.report import backtest

    truth = ChinchillaLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.4)
    grid = [(n, d) for n in np.geomspace(1e5, 8e5, 4) for d in np.geomspace(1e6, 8e6, 4)]
    lawful = [{"name": "", "N": n, "D": d, "val_loss": float(truth.loss(n, d))} for n, d in grid]
    rows = backtest(lawful)
    # the fourth refit keeps the runs with C <= C_max / 4 and predicts the rest, up to 4x its compute
    assert {r["left_out"] for r in rows} == {"largest N", "largest D", "largest N and D", "C above C_max / 4"}
    above = [r for r in rows if r["left_out"] == "C above C_max / 4"]
    assert {(r["N"], r["D"]) for r in above} == {(n, d) for n, d in grid if 6 * n * d > 6 * 8e5 * 8e6 / 4}
    assert {r["law"] for r in rows} == {"chinchilla", "kaplan"}
    assert max(abs(r["error"]) for r in rows if r["law"] == "chinchilla") < 0.005
    # with only two token budgets left, B / D^beta is not identifiable: those backtests are skipped
    assert {r["left_out"] for r in backtest([r for r in lawful if r["D"] > 1.5e6])} == {"largest N",
                                                                                       "C above C_max / 4"}
    # an N x D interaction (bigger models gain more from more tokens), as short CPU runs show:
    # the additive form cannot extrapolate it, and the corner left out says so
    bent = [dict(r, val_loss=r["val_loss"] - 0.05 * np.log2(r["N"] / 1e5) * np.log2(r["D"] / 1e6))
            for r in lawful]
    corner = {r["law"]: r for r in backtest(bent) if r["left_out"] == "largest N and D"}
    assert len(corner) == 2 and corner["chinchilla"]["error"] > 0.03


def test_kaplan_joint_law_is_fitted_back_from_its_own_values():
    truth = KaplanLaw(N_c=3e6, D_c=2e6, alpha_N=0.3, alpha_D=0.25)
    N = np.repeat(np.geomspace(5e4, 8e5, 4), 3)
    D = np.tile(np.geomspace(4e6, 1.6e7, 3), 4)
    L = truth.loss(N, D)
    # the gap between the largest and smallest model grows with D (the additive form keeps it fixed)
    gaps = L[N == N.min()] - L[N == N.max()]
    assert np.all(np.diff(gaps) > 0)
    exact = fit_kaplan(N, D, L)
    for k, v in truth.as_dict().items():
        assert getattr(exact, k) == pytest.approx(v, rel=1e-3)
    rng = np.random.default_rng(0)
    noisy = fit_kaplan(N, D, L * np.exp(rng.normal(0, 0.003, len(N))))
    # 2x N on 2x D past the grid: within 1% under 0.3% noise
    assert noisy.loss(1.6e6, 3.2e7) == pytest.approx(truth.loss(1.6e6, 3.2e7), rel=0.01)
    from lmlab.scaling.report import backtest

    runs = [{"name": "", "N": n, "D": d, "val_loss": float(truth.loss(n, d))} for n, d in zip(N, D)]
    assert max(abs(r["error"]) for r in backtest(runs, laws=("kaplan",))) < 1e-3
    with pytest.raises(ValueError, match="2 sizes"):
        fit_kaplan(np.full(6, 1e5), D[:6], truth.loss(1e5, D[:6]))


def _grid_4x3(E, seed=0, noise=0.003):
    """A 4x3 sweep like docs/scaling/v5's (4 sizes x 2M-8M tokens) drawn from a known law."""
    truth = ChinchillaLaw(E=E, A=400.0, B=900.0, alpha=0.34, beta=0.4)
    N = np.repeat(np.geomspace(2e5, 3.2e6, 4), 3)
    D = np.tile([2e6, 4e6, 8e6], 4)
    return N, D, truth.loss(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, len(N)))


def _cheap(n, d, loss):
    return fit_chinchilla(n, d, loss, starts=8)


def test_a_law_with_no_irreducible_loss_is_flagged_not_identified():
    from lmlab.scaling.fit import identification, pinned_parameters

    N, D, L = _grid_4x3(E=0.0)
    law = fit_chinchilla(N, D, L)
    draws = bootstrap(_cheap, [N, D, L], n=30)
    ident = identification(law, draws)
    assert not ident["identified"] and ident["not_identified"] == ["E"]
    # most refits put E on the lower bound of the search, exp(-20), what v4 and v5 printed as "0.000"
    assert ident["pinned_share"]["E"] > 0.25 and "E" in ident["reason"]
    assert pinned_parameters(ChinchillaLaw(E=math.exp(-20), A=50.0, B=100.0, alpha=0.3, beta=0.25)) == {
        "E": "lower bound -20"}


def test_a_law_with_irreducible_loss_is_identified_and_covered():
    from lmlab.scaling.fit import identification

    N, D, L = _grid_4x3(E=1.7)
    law = fit_chinchilla(N, D, L)
    draws = bootstrap(_cheap, [N, D, L], n=30)
    ident = identification(law, draws)
    assert ident["identified"] and ident["pinned"] == {} and ident["reason"] == ""
    lo, hi = interval([d.E for d in draws])
    assert lo < 1.7 < hi


def test_power_law_exponent_is_constrained_and_flagged():
    X = np.geomspace(2e5, 3.2e6, 6)
    rising = fit_power_law(X, 2.5 + 0.05 * np.log(X / X[0]))  # loss rising with X, as v5's L(N) frontier
    assert rising.alpha >= 0 and "alpha" in rising.pinned
    assert fit_power_law(X, 2.0 + (3e4 / X) ** 0.3).pinned == {}
    with pytest.raises(ValueError, match="does not fall"):
        fit_power_law(X, 1.0 + 0.1 * np.log(X), irreducible=False)


def test_bootstrap_counts_failed_refits_and_never_raises_when_all_fail():
    def always_fails(*cols):
        raise ValueError("no start converged")

    draws = bootstrap(always_fails, [np.arange(6.0), np.arange(6.0)], n=7)
    assert list(draws) == [] and draws.failed == 7 and draws.errors == ["no start converged"]
    assert all(math.isnan(v) for v in interval([d for d in draws]))
    # a fit whose every L-BFGS start ends non-finite is a ValueError (was a TypeError), counted above
    N, D, L = _grid_4x3(E=1.7)
    with pytest.raises(ValueError, match="no L-BFGS start"):
        fit_chinchilla(N, D, L * np.nan)
