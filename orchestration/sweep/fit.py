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
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


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


def _fit_theta(logN, logD, logL, w, starts: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    best, best_val = None, np.inf
    for s in starts:
        res = minimize(_objective, s, args=(logN, logD, logL, w, delta), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                       options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and res.fun < best_val:
            best, best_val = res.x, res.fun
    return best, best_val


def fit_law(N, D, L, delta: float = HUBER_DELTA, n_starts: int = 4, extra_starts=()) -> LawFit:
    """Robust fit of L(N, D) from points; L-BFGS from the best `n_starts` grid points."""
    logN, logD, logL = (np.log(np.asarray(x, np.float64)) for x in (N, D, L))
    w = np.ones_like(logN)
    grid = _grid()
    scores = _grid_scores(grid, logN, logD, logL, w, delta)
    starts = np.concatenate([grid[np.argsort(scores)[:n_starts]], np.reshape(extra_starts, (-1, 5))])
    th, val = _fit_theta(logN, logD, logL, w, starts, delta)
    return LawFit.from_theta(th, val)


def bootstrap(N, D, L, n_boot: int = 200, seed: int = 0, level: float = 0.95, delta: float = HUBER_DELTA,
              progress=None) -> dict:
    """Point fit plus percentile bootstrap intervals for E, A, B, alpha, beta (resampling points)."""
    N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
    point = fit_law(N, D, L, delta)
    rng = np.random.default_rng(seed)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    samples = []
    for i in range(n_boot):
        w = np.bincount(rng.integers(0, len(N), len(N)), minlength=len(N)).astype(np.float64)
        # warm start from the full-data fit: a resample moves the optimum only a little
        th, _ = _fit_theta(logN, logD, logL, w, point.theta()[None], delta)
        if th is not None:
            f = LawFit.from_theta(th)
            samples.append([getattr(f, p) for p in PARAMS])
        if progress:
            progress(i + 1, n_boot)
    samples = np.array(samples).reshape(-1, len(PARAMS))
    q = (1 - level) / 2
    lo, hi = np.quantile(samples, [q, 1 - q], axis=0) if len(samples) else np.full((2, len(PARAMS)), np.nan)
    return {"fit": point, "samples": samples, "level": level,
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


# ---------------------------------------------------------------- plots and report
def write_plots(out_dir: Path, trials: list[dict], boot: dict, iso: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fit: LawFit = boot["fit"]
    sizes = sorted({t["N"] for t in trials})
    colours = {n: plt.cm.viridis(i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        c = colours[t["N"]]
        if t.get("curve"):
            ax.plot([p["flops"] for p in t["curve"]], [p["loss"] for p in t["curve"]], color=c, alpha=0.4, lw=1)
        ax.scatter([t["flops"]], [t["eval_loss"]], color=c, zorder=3)
    for n in sizes:
        ax.plot([], [], color=colours[n], label=f"N={n:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="loss (lines: train, dots: held-out)",
           title="Loss vs compute per model size")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "loss_vs_compute.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, lv in enumerate(iso):
        c = plt.cm.plasma(i / max(1, len(iso) - 1))
        ax.scatter(lv["N"], lv["L"], color=c, label=f"C={lv['C']:.3g}")
        xs = np.linspace(np.log(min(lv["N"])), np.log(max(lv["N"])), 50)
        ax.plot(np.exp(xs), np.polyval(lv["parabola"], xs), color=c, lw=1)
        if lv["N_opt"]:
            ax.scatter([lv["N_opt"]], [lv["L_min"]], color=c, marker="*", s=120, edgecolor="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss (train curve at C)", title="IsoFLOP curves")
    if iso:
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    cs = np.array([t["flops"] for t in trials])
    grid = np.geomspace(cs.min() / 3, cs.max() * 30, 60)
    n_opt, d_opt = fit.compute_optimal(grid)
    ax.plot(grid, fit.predict(n_opt, d_opt), "k-", label="fitted compute-optimal frontier")
    ax.scatter(cs, [t["eval_loss"] for t in trials], c=[colours[t["N"]] for t in trials], label="trials")
    ax.set(xscale="log", yscale="log", xlabel="FLOPs (C = 6ND for the frontier)", ylabel="held-out loss",
           title="Fitted frontier")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "frontier.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write_report(path: Path, trials: list[dict], boot: dict, optima: list[dict], iso: list[dict],
                 plots: list[Path]) -> Path:
    fit: LawFit = boot["fit"]
    pct = int(round(boot["level"] * 100))
    lines = ["# Scaling-law fit", "",
             f"{len(trials)} trials; L(N, D) = E + A/N^alpha + B/D^beta, Huber (delta={HUBER_DELTA}) on log "
             f"residuals, L-BFGS from a grid of starts; {len(boot['samples'])} bootstrap resamples.", "",
             f"| parameter | estimate | {pct}% interval |", "|---|---|---|"]
    for p in PARAMS:
        lo, hi = boot["ci"][p]
        lines.append(f"| {p} | {getattr(fit, p):.4g} | [{lo:.4g}, {hi:.4g}] |")
    lines += ["", "## Compute-optimal allocation (C = 6ND)", "",
              f"| C (FLOPs) | N_opt | N {pct}% | D_opt (tokens) | D {pct}% |", "|---|---|---|---|---|"]
    for o in optima:
        lines.append(f"| {o['C']:.3g} | {o['N_opt']:.3g} | [{o['N_ci'][0]:.3g}, {o['N_ci'][1]:.3g}] | "
                     f"{o['D_opt']:.3g} | [{o['D_ci'][0]:.3g}, {o['D_ci'][1]:.3g}] |")
    lines += ["", "## IsoFLOP minima (parabola in log N over the train-loss curves)", ""]
    if not iso:
        lines.append("Too few sizes share a compute level (needs 3).")
    for lv in iso:
        where = f"N_opt = {lv['N_opt']:.3g}, L = {lv['L_min']:.4g}" if lv["N_opt"] else \
            "no interior minimum (the optimum lies outside the sampled sizes)"
        lines.append(f"- C = {lv['C']:.3g}: {where}")
    lines += ["", "## Trials", "", "| key | size | N | D | FLOPs | lr | batch | held-out loss |",
              "|---|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: (t["N"], t["D"])):
        lines.append(f"| {t['key']} | {t['size']} | {t['N']:.3g} | {t['D']:.3g} | {t['flops']:.3g} | {t['lr']:.3g} "
                     f"| {t['batch_size']} | {t['eval_loss']:.5f} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
    return path
