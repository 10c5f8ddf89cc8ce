"""The lr x batch sub-grid: the best trial per (N, D) point, and power laws of the optimal learning
rate and batch size in N and D.

Video diffusion transformers are more sensitive to both than language models
(Yin et al., arXiv 2411.17470), so a sweep that fixes them fits a law of
mistuned runs. Per point (a size on a compute level, or a size at a budget):
the best trial is what the loss law is fitted on. The optimum of each
hyperparameter is the vertex of a parabola in its log through the best losses
of its three grid values around the best one (profile: the minimum over the
other hyperparameter), clipped to the sampled range; at a grid edge it is the
edge value, flagged. Then log lr_opt = c + p log N + q log D (likewise the
batch) by least squares, with Student-t intervals; when D does not vary
independently of N the law is fitted in N alone, and said so.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


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


def _optimum(values: np.ndarray, losses: np.ndarray) -> tuple[float, str]:
    """Optimum of a profile (grid values, best loss at each) in log space: local parabola vertex."""
    order = np.argsort(values)
    v, lo = np.log(values[order]), losses[order]
    i = int(np.argmin(lo))
    if len(v) < 3:
        return float(np.exp(v[i])), "grid value (fewer than 3 values)"
    if i == 0 or i == len(v) - 1:
        return float(np.exp(v[i])), "at the edge of the sub-grid"
    x, y = v[i - 1:i + 2], lo[i - 1:i + 2]
    k2, k1, _ = np.polyfit(x, y, 2)
    if k2 <= 0:
        return float(np.exp(v[i])), "grid value"
    return float(np.exp(np.clip(-k1 / (2 * k2), x[0], x[-1]))), "parabola vertex"


def subgrid_optima(results: list[dict]) -> list[dict]:
    """Per (N, D) point with a sub-grid: the optimal lr and batch size."""
    groups: dict = {}
    for r in results:
        groups.setdefault(point_key(r), []).append(r)
    out = []
    for k, rs in groups.items():
        best = min(rs, key=lambda r: r["eval_loss"])
        row = {"size": k[0], "N": best["N"], "D": float(np.exp(np.mean(np.log([r["D"] for r in rs])))),
               "trials": len(rs), "best_lr": best["lr"], "best_batch": best["batch_size"],
               "best_loss": best["eval_loss"]}
        for name, field in (("lr", "lr"), ("batch", "batch_size")):
            vals = sorted({r[field] for r in rs})
            prof = np.array([min(r["eval_loss"] for r in rs if r[field] == v) for v in vals])
            row[f"{name}_opt"], row[f"{name}_how"] = _optimum(np.array(vals, float), prof)
            row[f"{name}_values"] = len(vals)
        out.append(row)
    return out


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


def lr_batch_laws(optima: list[dict], level: float = 0.95) -> dict:
    out = {"points": len(optima)}
    for name in ("lr", "batch"):
        if not optima or max(o[f"{name}_values"] for o in optima) < 2:
            out[name] = {"skipped": f"one {name} value in the grid: no sub-grid to optimise over"}
            continue
        out[name] = power_law([o["N"] for o in optima], [o["D"] for o in optima],
                              [o[f"{name}_opt"] for o in optima], level)
        out[name]["at_edge"] = sum(o[f"{name}_how"] == "at the edge of the sub-grid" for o in optima)
    return out
