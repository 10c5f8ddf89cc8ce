"""Scaling-law fits for `vgpt sweep fit`: L(N, D) = E + A/N^alpha + B/D^beta.

Why this way (NOTES.md, Scaling-law fits): Epoch AI's Chinchilla replication
fits the law in log space, log L = LSE(a - alpha log N, b - beta log D, e)
with a = log A, b = log B, e = log E, minimising a Huber loss on the log
residuals with L-BFGS from a grid of starting points (one start is not
enough: the surface has flat valleys). The grid is scored in one vectorised
pass and L-BFGS runs from the best few. Confidence intervals come from a
bootstrap over the (N, D, L) points. Compute-optimal N and D for C = 6ND
follow in closed form. IsoFLOP minima (Chinchilla approach 2) are a second,
model-free view: per compute level, a parabola in log N through the losses of
the sizes that reached it. Plots (matplotlib Agg) and a markdown report.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
# Every fit here is a 5-parameter problem over tens of points: BLAS threads only add start-up and
# spinning. Measured on a busy 2-core box, bootstrap(30 resamples) took 9.7 s with OpenBLAS's default
# threads and 0.48 s with one; the entry points below run with one BLAS thread.
SINGLE_BLAS_THREAD = threadpool_limits.wrap(limits=1, user_api="blas")
# resamples per fit_many call in `bootstrap`, so between two of its progress calls (runner.py's
# progress lines count on this step)
BOOTSTRAP_CHUNK = 10


# box for (a, b, e, alpha, beta): wide enough never to bind on a sane sweep, narrow enough that a
# degenerate one (few points) cannot run e to -inf or an exponent off to infinity
BOUNDS = [(-10.0, 80.0), (-10.0, 80.0), (-15.0, 5.0), (1e-3, 5.0), (1e-3, 5.0)]


@dataclasses.dataclass
class LawFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")

    def theta(self) -> np.ndarray:  # log-space parametrisation (a, b, e, alpha, beta)
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    @classmethod
    def from_theta(cls, th, objective=float("nan")) -> "LawFit":
        a, b, e, al, be = (float(x) for x in th)
        return cls(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=al, beta=be,
                   objective=float(objective))

    def predict(self, N, D) -> np.ndarray:
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    def compute_optimal(self, C) -> tuple[np.ndarray, np.ndarray]:
        """N_opt, D_opt minimising L under C = 6ND (Chinchilla, Approach 3 closed form)."""
        C = np.asarray(C, float)
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return G * (C / 6) ** (self.beta / s), (C / 6) ** (self.alpha / s) / G


# ---------------------------------------------------------------- objective
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    val = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return val, np.clip(r, -delta, delta)  # value, derivative


def _objective(th: np.ndarray, logN, logD, logL, w, delta) -> tuple[float, np.ndarray]:
    a, b, e, al, be = th
    terms = np.stack([a - al * logN, b - be * logD, np.full_like(logN, e)])  # [3, n]
    lse = logsumexp(terms, axis=0)
    soft = np.exp(terms - lse)
    val, dval = _huber(lse - logL, delta)
    g = w * dval
    grad = np.array([(g * soft[0]).sum(), (g * soft[1]).sum(), (g * soft[2]).sum(),
                     -(g * soft[0] * logN).sum(), -(g * soft[1] * logD).sum()])
    return float((w * val).sum()), grad


def _grid() -> np.ndarray:
    """Epoch AI's start grid (a, b over 0..25, e over -1..1.5, alpha, beta over 0..2), slightly thinned."""
    return np.array(list(itertools.product(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 2, 0.5),
                                           np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))))


def _grid_scores(grid: np.ndarray, logN, logD, logL, w, delta) -> np.ndarray:
    a, b, e, al, be = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack([a - al * logN, b - be * logD, np.broadcast_to(e, (len(grid), len(logN)))])
    val, _ = _huber(logsumexp(terms, axis=0) - logL, delta)
    return (w * val).sum(axis=1)


def _fit_theta(logN, logD, logL, w, starts: np.ndarray, delta: float, maxiter: int = 400) -> tuple[np.ndarray, float]:
    best, best_val = None, np.inf
    for s in starts:
        res = minimize(_objective, s, args=(logN, logD, logL, w, delta), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                       options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and res.fun < best_val:
            best, best_val = res.x, res.fun
    return best, best_val


@SINGLE_BLAS_THREAD
def fit_law(N, D, L, delta: float = HUBER_DELTA, n_starts: int = 4, extra_starts=()) -> LawFit:
    """Robust fit of L(N, D) from points; L-BFGS from the best `n_starts` grid points."""
    logN, logD, logL = (np.log(np.asarray(x, np.float64)) for x in (N, D, L))
    w = np.ones_like(logN)
    grid = _grid()
    scores = _grid_scores(grid, logN, logD, logL, w, delta)
    starts = np.concatenate([grid[np.argsort(scores)[:n_starts]], np.reshape(extra_starts, (-1, 5))])
    th, val = _fit_theta(logN, logD, logL, w, starts, delta)
    return LawFit.from_theta(th, val)


@SINGLE_BLAS_THREAD
def fit_many(logN, logD, logL, W: np.ndarray, start: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Fits of the same points under B weightings (rows of W: bootstrap counts, leave-one-out masks),
    each warm-started from `start` (a resample moves the optimum only a little). Thetas [B, 5]
    (NaN rows where a fit failed). One joint L-BFGS over the B separable problems was tried and is
    slower: the shared curvature memory needs far more iterations."""
    W = np.atleast_2d(np.asarray(W, np.float64))
    out = np.full((len(W), 5), np.nan)
    for i, w in enumerate(W):
        th, _ = _fit_theta(logN, logD, logL, w, np.asarray(start, np.float64)[None], delta, maxiter=200)
        if th is not None:
            out[i] = th
    return out


@SINGLE_BLAS_THREAD
def bootstrap(N, D, L, n_boot: int = 200, seed: int = 0, level: float = 0.95, delta: float = HUBER_DELTA,
              progress=None) -> dict:
    """Point fit plus percentile bootstrap intervals for E, A, B, alpha, beta (resampling points).
    `samples` holds the resamples' parameters, `thetas` the same in the fit's log space."""
    N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
    point = fit_law(N, D, L, delta)
    rng = np.random.default_rng(seed)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    # np.array, not np.stack: fit.bootstrap=0 (no intervals) gives an empty [0, n] matrix
    W = np.array([np.bincount(rng.integers(0, len(N), len(N)), minlength=len(N)) for _ in range(n_boot)],
                 dtype=np.float64).reshape(n_boot, len(N))
    thetas = np.empty((0, 5))
    for lo in range(0, n_boot, BOOTSTRAP_CHUNK):
        chunk = W[lo:lo + BOOTSTRAP_CHUNK]
        thetas = np.concatenate([thetas, fit_many(logN, logD, logL, chunk, point.theta(), delta)])
        if progress:
            progress(len(thetas), n_boot)
    thetas = thetas[np.all(np.isfinite(thetas), axis=1)]
    samples = np.array([[getattr(LawFit.from_theta(t), p) for p in PARAMS] for t in thetas]).reshape(-1, len(PARAMS))
    q = (1 - level) / 2
    lo, hi = np.quantile(samples, [q, 1 - q], axis=0) if len(samples) else np.full((2, len(PARAMS)), np.nan)
    return {"fit": point, "samples": samples, "thetas": thetas, "level": level,
            "ci": {p: (float(lo[i]), float(hi[i])) for i, p in enumerate(PARAMS)}}


def compute_optimal_ci(boot: dict, C: float) -> dict:
    """N_opt, D_opt at budget C from the point fit, with bootstrap percentile intervals."""
    n, d = boot["fit"].compute_optimal(C)
    ns, ds = [], []
    for row in boot["samples"]:
        f = LawFit(*row)
        if f.alpha > 0 and f.beta > 0:
            a, b = f.compute_optimal(C)
            ns.append(a), ds.append(b)
    q = (1 - boot["level"]) / 2
    ci = lambda xs: tuple(float(x) for x in np.quantile(xs, [q, 1 - q])) if xs else (float("nan"),) * 2
    return {"C": float(C), "N_opt": float(n), "D_opt": float(d), "N_ci": ci(ns), "D_ci": ci(ds)}


# ---------------------------------------------------------------- IsoFLOP
def isoflop_minima(curves: dict, levels: int = 5) -> list[dict]:
    """Chinchilla approach 2. `curves`: N -> (C array, L array) along training. For each compute
    level reached by at least 3 sizes, interpolate each size's loss at C (log-log), fit a parabola
    in log N and take its vertex (only when it is a minimum inside the sampled range)."""
    if len(curves) < 3:
        return []
    lo = max(np.min(c) for c, _ in curves.values())
    his = sorted((np.max(c) for c, _ in curves.values()), reverse=True)
    hi = his[2]  # reached by the 3 longest-running sizes
    if not hi > lo:
        return []
    out = []
    for C in np.geomspace(lo, hi, levels):
        ns, ls = [], []
        for n, (c, l) in curves.items():
            c, l = np.asarray(c, float), np.asarray(l, float)
            if c.min() <= C <= c.max():
                o = np.argsort(c)
                ns.append(n)
                ls.append(float(np.exp(np.interp(np.log(C), np.log(c[o]), np.log(l[o])))))
        if len(ns) < 3:
            continue
        x = np.log(ns)
        k2, k1, k0 = np.polyfit(x, ls, 2)
        vertex = -k1 / (2 * k2) if k2 > 0 else np.nan
        ok = bool(k2 > 0 and x.min() <= vertex <= x.max())
        out.append({"C": float(C), "N": [float(n) for n in ns], "L": ls, "parabola": [k2, k1, k0],
                    "N_opt": float(np.exp(vertex)) if ok else None,
                    "L_min": float(np.polyval([k2, k1, k0], vertex)) if ok else None})
    return out
