"""Scaling-law fits.

* `ChinchillaLaw`: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2), fitted as
  its Approach 3 does: Huber loss (delta = 1e-3) between log L and the log-sum-exp form of the law,
  minimised with L-BFGS from a grid of initialisations. With C = 6ND its compute-optimal allocation
  has the closed form N*(C) = G (C/6)^(beta/(alpha+beta)), D*(C) = (C/6) / N*(C),
  G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, eq. 4).
* `KaplanLaw`: L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (Kaplan et al. 2020, eq. 1.5), whose
  gap between model sizes grows with D, fitted by least squares on log L.
* `PowerLaw`: L(X) = E + (X_c / X)^alpha, one variable (Kaplan et al. 2020 use E = 0).
* `isoflop_optima`: Approach 2 — for each compute budget, the N that minimises a parabola fitted to
  loss against log N; then N*(C) and D*(C) as power laws of C.
* `bootstrap`: refit on resampled runs for confidence intervals, counting the refits that failed.
* `pinned_parameters`: the parameters a fit left on a bound of its search. A parameter pinned at a
  bound is not identified by the data (the optimum lies outside the searched range, or the objective
  is flat in it), so the law's allocations and extrapolations are not to be trusted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, Appendix D.2


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    value = np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))
    grad = np.where(a <= delta, r, delta * np.sign(r))
    return value, grad


@dataclass
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C):
        """(N*, D*) minimising L(N, D) subject to 6 N D = C."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        C = np.asarray(C, dtype=float)
        N = G * (C / 6.0) ** (b / (a + b))
        return N, (C / 6.0) / N

    def optimal_tokens(self, N):
        """The D for which N is the compute-optimal size (inverse of N*(C) above)."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        N = np.asarray(N, dtype=float)
        return (N / G) ** ((a + b) / b) / N

    def as_dict(self) -> dict:
        return asdict(self)


CHINCHILLA_APPROACH3 = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022


def _chinchilla_objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                          delta: float) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    m = terms.max(axis=0)
    w = np.exp(terms - m)
    s = w.sum(axis=0)
    lse = m + np.log(s)
    w /= s
    value, g = _huber(lse - logL, delta)
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * logN).sum(), -(g * w[1] * logD).sum()])
    return float(value.sum()), grad


DEFAULT_GRID = {  # Hoffmann et al. 2022, Appendix D.2 (a = log A, b = log B, e = log E)
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


# a, b, e (logs of A, B, E), alpha, beta: exponents stay non-negative and the scales finite, so that a
# degenerate resample (a bootstrap draw of few distinct runs) cannot run off to exp(a) = inf
THETA_BOUNDS = [(-50.0, 200.0), (-50.0, 200.0), (-20.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


# how close (in the optimiser's coordinates: logs of the scales, the exponents themselves) a parameter
# must sit to a bound of THETA_BOUNDS to count as pinned there; L-BFGS-B lands exactly on an active bound
BOUND_TOL = 1e-3
CHINCHILLA_COORDS = (("A", True), ("B", True), ("E", True), ("alpha", False), ("beta", False))  # (name, log?)


def _pinned(values: Sequence[float], bounds: Sequence[tuple[float, float]],
            names: Sequence[str]) -> dict[str, str]:
    out = {}
    for v, (lo, hi), name in zip(values, bounds, names, strict=True):
        if v <= lo + BOUND_TOL:
            out[name] = f"lower bound {lo:g}"
        elif v >= hi - BOUND_TOL:
            out[name] = f"upper bound {hi:g}"
    return out


def pinned_parameters(law: ChinchillaLaw) -> dict[str, str]:
    """{parameter: which bound} for the parameters of a fitted Chinchilla law that sit on a bound of the
    search (THETA_BOUNDS); e.g. E = exp(-20) = 2.1e-9 is "lower bound -20" of log E."""
    d = law.as_dict()
    values = [math.log(d[k]) if log and d[k] > 0 else (-math.inf if log else d[k]) for k, log in CHINCHILLA_COORDS]
    return _pinned(values, THETA_BOUNDS, [k for k, _ in CHINCHILLA_COORDS])


def _grid_values(thetas: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                 delta: float) -> np.ndarray:
    """The objective at every grid point at once ([K, 5] -> [K])."""
    a, b, e, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(thetas), len(logN)))])
    m = terms.max(axis=0)
    lse = m + np.log(np.exp(terms - m).sum(axis=0))
    return _huber(lse - logL, delta)[0].sum(axis=1)


def fit_chinchilla(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, delta: float = HUBER_DELTA,
                   grid: dict | None = None, starts: int = 64) -> ChinchillaLaw:
    """Fit E, A, B, alpha, beta to observed final losses L of runs with N parameters on D tokens.

    The objective is evaluated on the whole initialisation grid at once, and L-BFGS starts from the
    `starts` best grid points (Hoffmann et al. start from every one; on our synthetic tests the best
    few dozen reach the same optimum at a fraction of the time)."""
    from scipy.optimize import minimize

    logN, logD, logL = (np.log(np.asarray(v, dtype=float)) for v in (N, D, L))
    if len(logL) < 5:
        raise ValueError(f"need at least 5 runs to fit 5 parameters, got {len(logL)}")
    grid = grid or DEFAULT_GRID
    thetas = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))
    order = np.argsort(_grid_values(thetas, logN, logD, logL, delta), kind="stable")
    best, best_value = None, math.inf
    for theta in thetas[order[:starts]]:
        # tight tolerances: the Huber objective is ~1e-5 near the optimum, where L-BFGS-B's default
        # relative ftol stops early on a nearly flat valley and extrapolations drift by percents
        res = minimize(_chinchilla_objective, theta, args=(logN, logD, logL, delta), jac=True,
                       method="L-BFGS-B", bounds=THETA_BOUNDS,
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000})
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, res.fun
    if best is None:
        raise ValueError(f"no L-BFGS start of {starts} reached a finite Chinchilla fit")
    a, b, e, alpha, beta = best
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


@dataclass
class KaplanLaw:
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020, eq. 1.5).

    Unlike the additive Chinchilla form, the gap between two model sizes grows with D: with few tokens
    every size is data-limited and the data term dominates, with many the size term does. Short CPU
    runs show exactly that growth. Kaplan et al. fit alpha_N = 0.076, alpha_D = 0.095."""

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float

    def loss(self, N, D):
        logN, logD = np.log(np.asarray(N, dtype=float)), np.log(np.asarray(D, dtype=float))
        return np.exp(self.alpha_D * np.logaddexp(self.alpha_N / self.alpha_D * (math.log(self.N_c) - logN),
                                                  math.log(self.D_c) - logD))

    def as_dict(self) -> dict:
        return asdict(self)


KAPLAN_GRID = {"log_N_c": (8.0, 12.0, 16.0, 20.0), "log_D_c": (10.0, 14.0, 18.0),
               "alpha_N": (0.05, 0.1, 0.3), "alpha_D": (0.05, 0.1, 0.3)}


def _kaplan_residuals(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray) -> np.ndarray:
    log_nc, log_dc, a_n, a_d = theta
    return a_d * np.logaddexp(a_n / a_d * (log_nc - logN), log_dc - logD) - logL


def fit_kaplan(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, starts: int = 16) -> KaplanLaw:
    """Least squares on log L from the `starts` best points of a grid of initialisations."""
    from scipy.optimize import least_squares

    logN, logD, logL = (np.log(np.asarray(v, dtype=float)) for v in (N, D, L))
    if min(len(np.unique(logN)), len(np.unique(logD))) < 2 or len(logL) < 5:
        raise ValueError("Kaplan's L(N, D) needs at least 5 runs spanning 2 sizes and 2 token budgets")
    grid = np.array(list(itertools.product(*KAPLAN_GRID.values())))
    cost = [float(np.sum(_kaplan_residuals(t, logN, logD, logL) ** 2)) for t in grid]
    best = None
    for theta in grid[np.argsort(cost, kind="stable")[:starts]]:
        res = least_squares(_kaplan_residuals, theta, args=(logN, logD, logL), method="trf",
                            bounds=([-50, -50, 1e-4, 1e-4], [200, 200, 5, 5]), xtol=1e-12, ftol=1e-12)
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise ValueError(f"no start of {starts} reached a finite Kaplan fit")
    log_nc, log_dc, a_n, a_d = best.x
    return KaplanLaw(N_c=math.exp(log_nc), D_c=math.exp(log_dc), alpha_N=float(a_n), alpha_D=float(a_d))


@dataclass
class PowerLaw:
    """L(X) = E + (X_c / X)^alpha, alpha >= 0 (loss does not rise with X). `pinned` names the parameters
    the fit left on a bound of its search (e.g. alpha at 0: the data show no fall of the loss with X)."""

    E: float
    X_c: float
    alpha: float
    pinned: dict[str, str] = field(default_factory=dict)

    def loss(self, X):
        return self.E + (self.X_c / np.asarray(X, dtype=float)) ** self.alpha

    def as_dict(self) -> dict:
        return asdict(self)


NEGLIGIBLE_E = 1e-3  # E below this share of the loss changes no fitted loss by more than the Huber delta
# c = alpha log X_c, alpha, e = log E; alpha >= 0 constrains the sign of the exponent
POWER_LAW_BOUNDS = [(-50.0, 200.0), (0.0, 5.0), (-20.0, 5.0)]


def _x_c(c: float, alpha: float) -> float:
    """X_c = exp(c / alpha); inf when alpha sits at 0 (the law is then the constant E + exp(c))."""
    return math.exp(c / alpha) if alpha > 0 and c / alpha < 700 else math.inf


def fit_power_law(X: Sequence[float], L: Sequence[float], *, irreducible: bool = True,
                  delta: float = HUBER_DELTA) -> PowerLaw:
    """Fit L(X) = E + (X_c/X)^alpha with alpha >= 0 (E = 0 when `irreducible` is False, Kaplan et al.'s
    form). A fit that ends on a bound says so in `pinned`."""
    from scipy.optimize import minimize

    logX, logL = np.log(np.asarray(X, dtype=float)), np.log(np.asarray(L, dtype=float))
    if not irreducible:  # straight line in log-log space
        slope, intercept = np.polyfit(logX, logL, 1)
        if slope >= 0:
            raise ValueError(f"loss does not fall with X (log-log slope {slope:+.3g}): no power law with "
                             "a positive exponent")
        alpha = -slope
        return PowerLaw(E=0.0, X_c=float(math.exp(intercept / alpha)), alpha=float(alpha))

    def objective(theta):  # log L = LSE(alpha log X_c - alpha log X, e)
        c, alpha, e = theta
        t = np.stack([c - alpha * logX, np.full_like(logX, e)])
        m = t.max(axis=0)
        w = np.exp(t - m)
        s = w.sum(axis=0)
        value, g = _huber(m + np.log(s) - logL, delta)
        w /= s
        return float(value.sum()), np.array([(g * w[0]).sum(), -(g * w[0] * logX).sum(), (g * w[1]).sum()])

    best = min((minimize(objective, np.array([c, al, e]), jac=True, method="L-BFGS-B", bounds=POWER_LAW_BOUNDS)
                for c, al, e in itertools.product((0.0, 5.0, 10.0), (0.1, 0.5, 1.0), (-1.0, 0.0, 1.0))),
               key=lambda r: r.fun)
    c, alpha, e = (float(v) for v in best.x)
    pinned = _pinned([alpha, e], POWER_LAW_BOUNDS[1:], ["alpha", "E"])
    if "E" not in pinned and math.exp(e) < NEGLIGIBLE_E * math.exp(logL.min()):
        # the objective is flat in e once E is this small, so L-BFGS stops short of the bound: the data
        # say only that E is near 0, i.e. E is not measured (Kaplan et al.'s E = 0 form fits as well)
        pinned["E"] = f"flat floor: E < {NEGLIGIBLE_E:.1%} of the smallest loss"
    return PowerLaw(E=math.exp(e), X_c=_x_c(c, alpha), alpha=alpha, pinned=pinned)


@dataclass
class IsoFlopResult:
    budgets: list[float]         # compute of each IsoFLOP group
    n_opt: list[float]           # loss-minimising N per budget
    n_exponent: float            # N*(C) ∝ C^a
    d_exponent: float            # D*(C) ∝ C^b
    n_coef: float
    d_coef: float

    def compute_optimal(self, C):
        C = np.asarray(C, dtype=float)
        return self.n_coef * C**self.n_exponent, self.d_coef * C**self.d_exponent


ISOFLOP_TOLERANCE = 0.15  # a doubling grid of target sizes lands on equal 6ND only roughly: counted N
                         # differ from the targets by up to ~12% (e.g. 2.24e5 for 2e5)


def isoflop_optima(N: Sequence[float], D: Sequence[float], L: Sequence[float], *,
                   rel_tol: float = ISOFLOP_TOLERANCE) -> IsoFlopResult:
    """Approach 2: group runs of equal compute 6ND (within `rel_tol`), fit a parabola of L in log N per
    group (at least 3 sizes), take its minimum, then fit N* and D* = C / (6 N*) as power laws of C."""
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    C = 6 * N * D
    order = np.argsort(C)
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(C[i] / C[groups[-1][0]] - 1) <= rel_tol:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    budgets, n_opt = [], []
    for g in groups:
        if len(g) < 3:
            continue
        x = np.log(N[g])
        c2, c1, _ = np.polyfit(x, L[g], 2)
        if c2 <= 0:
            continue  # no minimum inside this profile
        budgets.append(float(np.mean(C[g])))
        n_opt.append(float(math.exp(-c1 / (2 * c2))))
    if len(budgets) < 2:
        raise ValueError("Approach 2 needs at least two IsoFLOP profiles of 3 or more model sizes each")
    a, log_kn = np.polyfit(np.log(budgets), np.log(n_opt), 1)
    d_opt = np.asarray(budgets) / (6 * np.asarray(n_opt))
    b, log_kd = np.polyfit(np.log(budgets), np.log(d_opt), 1)
    return IsoFlopResult(budgets, n_opt, float(a), float(b), float(math.exp(log_kn)), float(math.exp(log_kd)))


class Draws(list):
    """Bootstrap refits (a list), with `failed`: how many resamples gave no fit, and `errors`: why."""

    def __init__(self, fits=(), failed: int = 0, errors: Sequence[str] = ()):
        super().__init__(fits)
        self.failed = failed
        self.errors = list(errors)


def bootstrap(fit: Callable[..., object], columns: Sequence[Sequence[float]], *, n: int = 200,
              seed: int = 0) -> Draws:
    """Refit `fit(*columns)` on `n` resamples (with replacement) of the runs. Resamples whose fit
    fails (too few distinct runs, no finite optimum) are counted in `.failed`, not silently dropped."""
    rng = np.random.default_rng(seed)
    cols = [np.asarray(c, dtype=float) for c in columns]
    out = Draws()
    for _ in range(n):
        idx = rng.integers(0, len(cols[0]), size=len(cols[0]))
        try:
            out.append(fit(*(c[idx] for c in cols)))
        except (ValueError, np.linalg.LinAlgError) as e:
            out.failed += 1
            if str(e) not in out.errors:
                out.errors.append(str(e))
    return out


def identification(law: ChinchillaLaw, draws: Sequence[ChinchillaLaw], level: float = 0.9) -> dict:
    """Is each parameter of a Chinchilla fit identified by the data? A parameter is not when the fit
    sits on a bound of the search, or when its `level` bootstrap interval reaches one (more than
    (1 - level) / 2 of the refits pinned there: the interval's end is then the bound, not the data).

    Returns {"identified": bool, "pinned": {param: bound} of the fit itself, "pinned_share": {param:
    share of bootstrap refits on a bound}, "not_identified": [params], "reason": a sentence or ""}."""
    pinned = pinned_parameters(law)
    draw_pins = [pinned_parameters(d) for d in draws]
    share = {k: (sum(k in p for p in draw_pins) / len(draws) if draws else math.nan) for k, _ in CHINCHILLA_COORDS}
    tail = (1 - level) / 2
    bad = [k for k, _ in CHINCHILLA_COORDS if k in pinned or share[k] > tail]
    why = []
    for k in bad:
        where = f"the fit sits on the {pinned[k]}" if k in pinned else "the fit is inside the bounds"
        why.append(f"{k}: {where}, as do {share[k]:.0%} of {len(draws)} bootstrap refits")
    reason = ("not identified by these runs (" + "; ".join(why) + "): the data do not pin the law down, so "
              "its allocations and extrapolations are not measurements") if bad else ""
    return {"identified": not bad, "pinned": pinned, "pinned_share": share, "not_identified": bad,
            "reason": reason}


def interval(values: Sequence[float], level: float = 0.9) -> tuple[float, float]:
    """The central `level` interval of bootstrap values; (nan, nan) when there are none."""
    if len(values) == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(np.asarray(values, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
