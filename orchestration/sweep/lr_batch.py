"""The lr x batch sub-grid: the best trial per (N, D) point, and power laws of the optimal learning
rate and batch size in N and D, fitted only where the sub-grid determines them.

Video diffusion transformers are more sensitive to both than language models
(Yin et al., arXiv 2411.17470), so a sweep that fixes them fits a law of
mistuned runs. Per point (a size on a compute level, or a size at a budget):
the best trial is what the loss law is fitted on. The optimum of each
hyperparameter comes from its profile (the best loss at each of its grid
values, minimised over the other hyperparameter). It is *interior* when the
axis has at least MIN_VALUES values at the point and the best one is neither
the smallest nor the largest: then it is the vertex of a parabola in log
through the best value and its two neighbours. Otherwise it is only the best
grid value, and says nothing about where the optimum is: at an edge the
optimum may lie anywhere beyond it, and with two values every best value is
at an edge by construction.

The rule for a law (log lr_opt = c + p log N + q log D, likewise the batch;
least squares, Student-t intervals; in N alone when D does not vary
independently of N, and said so): it is fitted only when *more than half* of
the points (MIN_INTERIOR_SHARE) have an interior optimum on that axis, and only
on those points: an edge value is a bound, not an optimum. Otherwise the law is
"not determined" and `not_determined_because` says why (too few values per
point, or k of n optima at a sub-grid edge), as identifiability.py does for
L(N, D): a degenerate fit through edge values would read as a law.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from orchestration.sweep.fit import SINGLE_BLAS_THREAD

AXES = (("lr", "lr"), ("batch", "batch_size"))  # (law name, trial field)
MIN_VALUES = 3  # grid values an axis needs at a point for its best one to be interior
MIN_INTERIOR_SHARE = 0.5  # a law needs an interior optimum at more than this share of the points
INTERIOR, EDGE, FEW = "interior", "edge", "too few values"  # where a point's optimum lies


def point_key(r: dict) -> tuple:
    """The (N, D) point a trial belongs to: its size and compute level, or its size and budget."""
    return (r["size"], ("level", r["level"]) if r.get("level") else ("budget", r["budget"]))


def best_per_point(results: list[dict]) -> list[dict]:
    """Per (N, D) point keep the trial with the lowest held-out loss."""
    best: dict = {}
    for r in results:
        k = point_key(r)
        if k not in best or r["eval_loss"] < best[k]["eval_loss"]:
            best[k] = r
    return list(best.values())


def _optimum(values: np.ndarray, losses: np.ndarray) -> tuple[float, str, str]:
    """(optimum, where: INTERIOR | EDGE | FEW, how) of a profile (grid values, best loss at each), in log
    space: the vertex of the parabola through the best value and its neighbours when that is interior."""
    order = np.argsort(values)
    v, lo = np.log(values[order]), losses[order]
    i = int(np.argmin(lo))
    if len(v) < MIN_VALUES:
        return float(np.exp(v[i])), FEW, f"best of {len(v)} grid value(s)"
    if i == 0 or i == len(v) - 1:
        return float(np.exp(v[i])), EDGE, "at the edge of the sub-grid"
    x, y = v[i - 1:i + 2], lo[i - 1:i + 2]
    k2, k1, _ = np.polyfit(x, y, 2)
    if k2 <= 0:  # ties with a neighbour: the best value is still inside the grid
        return float(np.exp(v[i])), INTERIOR, "grid value"
    return float(np.exp(np.clip(-k1 / (2 * k2), x[0], x[-1]))), INTERIOR, "parabola vertex"


def subgrid_optima(results: list[dict]) -> list[dict]:
    """Per (N, D) point with a sub-grid: the optimal lr and batch size, and where each lies."""
    groups: dict = {}
    for r in results:
        groups.setdefault(point_key(r), []).append(r)
    out = []
    for k, rs in groups.items():
        best = min(rs, key=lambda r: r["eval_loss"])
        row = {"size": k[0], "group": k[1][1], "N": best["N"],
               "D": float(np.exp(np.mean(np.log([r["D"] for r in rs])))),
               "trials": len(rs), "best_lr": best["lr"], "best_batch": best["batch_size"],
               "best_loss": best["eval_loss"]}
        for name, field in AXES:
            vals = sorted({r[field] for r in rs})
            prof = np.array([min(r["eval_loss"] for r in rs if r[field] == v) for v in vals])
            row[f"{name}_opt"], row[f"{name}_where"], row[f"{name}_how"] = _optimum(np.array(vals, float), prof)
            row[f"{name}_values"] = len(vals)
        out.append(row)
    return out


@SINGLE_BLAS_THREAD
def power_law(N, D, y, level: float = 0.95) -> dict:
    """log y = c + p log N + q log D by least squares, Student-t intervals; N alone when D is not
    independent of N (rank), or when too few points."""
    N, D, y = (np.log(np.asarray(a, float)) for a in (N, D, y))
    X = np.stack([np.ones_like(N), N, D], axis=1)
    names = ["coef", "N", "D"]
    if len(y) < 4 or np.linalg.matrix_rank(X, tol=1e-6 * max(1.0, np.abs(X).max())) < 3:
        X, names = X[:, :2], names[:2]
    if len(y) <= X.shape[1]:
        return {"skipped": f"{len(y)} points for {X.shape[1]} coefficients"}
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ beta
    dof = len(y) - X.shape[1]
    s2 = float(r @ r) / dof
    cov = s2 * np.linalg.pinv(X.T @ X)
    t = stats.t.ppf(0.5 + level / 2, dof)
    se = np.sqrt(np.diag(cov))
    out = {"dof": dof, "rmse_log": float(np.sqrt(s2)), "in": names[1:]}
    for i, n in enumerate(names):
        lo, hi = beta[i] - t * se[i], beta[i] + t * se[i]
        if n == "coef":
            out["coef"], out["coef_ci"] = float(np.exp(beta[i])), [float(np.exp(lo)), float(np.exp(hi))]
        else:
            out[f"exp_{n}"], out[f"exp_{n}_ci"] = float(beta[i]), [float(lo), float(hi)]
    if len(names) == 2:
        out["note"] = "D does not vary independently of N here: fitted in N alone"
    return out


def _values_per_point(counts: list[int], name: str) -> str:
    lo, hi = min(counts), max(counts)
    return f"{hi if lo == hi else f'{lo} to {hi}'} {name} value{'' if hi == 1 else 's'} per point"


def axis_law(optima: list[dict], name: str, level: float = 0.95) -> dict:
    """The optimal-`name` law by the rule of the module docstring: {determined, ...the fit} or
    {determined: False, not_determined_because: [...]}, with the counts behind the decision."""
    n = len(optima)
    where = [o[f"{name}_where"] for o in optima]
    counts = {"points": n, "interior": where.count(INTERIOR), "at_edge": where.count(EDGE),
              "too_few_values": where.count(FEW)}
    values = [o[f"{name}_values"] for o in optima]
    why = []
    if not optima:
        why.append("no (N, D) points")
    elif max(values) < MIN_VALUES:
        why.append(f"the sub-grid has {_values_per_point(values, name)} (at least {MIN_VALUES} are needed for "
                   "an interior optimum)")
    elif counts["interior"] <= MIN_INTERIOR_SHARE * n:
        parts = [f"{counts['at_edge']} of {n} optima at a sub-grid edge"] if counts["at_edge"] else []
        if counts["too_few_values"]:
            parts.append(f"{counts['too_few_values']} of {n} points with fewer than {MIN_VALUES} {name} values")
        why.append(f"only {counts['interior']} of {n} points have an interior {name} optimum (more than "
                   f"{MIN_INTERIOR_SHARE:.0%} are needed): " + ", ".join(parts))
    if not why:
        inner = [o for o in optima if o[f"{name}_where"] == INTERIOR]
        law = power_law([o["N"] for o in inner], [o["D"] for o in inner], [o[f"{name}_opt"] for o in inner], level)
        if law.get("skipped"):
            why.append(f"{counts['interior']} interior optima: {law['skipped']}")
        else:
            return {"determined": True, **counts, "fitted_on": len(inner), **law}
    return {"determined": False, "not_determined_because": why, **counts}


def lr_batch_laws(optima: list[dict], level: float = 0.95) -> dict:
    """The optimal-lr and optimal-batch laws of a sweep's sub-grid optima (fit.json's lr_batch.laws)."""
    return {"points": len(optima), **{name: axis_law(optima, name, level) for name, _ in AXES}}
