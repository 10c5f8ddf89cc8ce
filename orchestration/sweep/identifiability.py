"""Can this sweep's L(N, D) be trusted? Checks before the fit, after it, and out of sample.

Before: the five parameters of E + A/N^alpha + B/D^beta need enough points and
at least `min_distinct` distinct model sizes N *and* distinct data budgets D (two
budgets leave beta and B unseparated from E: any curve through two D values
fits); points per compute level say whether IsoFLOP parabolas are possible.
After: a parameter whose estimate sits at (within `bound_tol` of the box width
of) a bound of the fit's box (fit.BOUNDS) was stopped by the box, not by the
data, and a bootstrap interval that reaches a bound is cut by it, so the
interval is not the data's. Out of sample: leave-one-out prediction error, and
the extrapolation check (fit on all but the largest-compute trials, predict
those). A failed design check or an estimate at a bound makes the law "not
identifiable": the report and fit.json say why and recommend no allocation. An
interval that reaches a bound (the estimate itself inside) is flagged as weakly
identified, next to the parameter and in the warnings, and the recommendation
stands with its (cut) intervals.
"""
from __future__ import annotations

import numpy as np

from orchestration.sweep.fit import BOUNDS, PARAMS, LawFit, bootstrap, fit_many

THETA = ("A", "B", "E", "alpha", "beta")  # fit.LawFit.theta() order: log A, log B, log E, alpha, beta
LEVEL_GAP = np.log(1.1)  # trials whose FLOPs differ by under 10% share a compute level (grids without levels)


def n_distinct(values, rel: float = 0.05) -> int:
    """Distinct values, counting values within `rel` of each other as one."""
    x = np.sort(np.log(np.asarray(values, float)))
    return int(1 + np.sum(np.diff(x) > np.log1p(rel))) if len(x) else 0


def compute_levels(points: list[dict]) -> list[float]:
    """The compute level of each point: its planned level (compute_levels grids), else FLOPs clustered
    (a new level where sorted log FLOPs jump by more than LEVEL_GAP), named by the level's mean."""
    if points and all(p.get("level") for p in points):
        return [float(p["level"]) for p in points]
    f = np.log([p["flops"] for p in points])
    order = np.argsort(f)
    group = np.zeros(len(f), int)
    group[order] = np.concatenate([[0], np.cumsum(np.diff(f[order]) > LEVEL_GAP)]) if len(f) else []
    means = {g: float(np.exp(f[group == g].mean())) for g in set(group.tolist())}
    return [means[g] for g in group]


def design(points: list[dict], cfg) -> dict:
    """The checks before fitting: points, distinct N and D, sizes per compute level."""
    levels = compute_levels(points)
    per_level = {}
    for p, c in zip(points, levels):
        per_level.setdefault(c, set()).add(p["N"])
    out = {"points": len(points), "distinct_N": n_distinct([p["N"] for p in points]),
           "distinct_D": n_distinct([p["D"] for p in points]),
           "sizes_per_level": [{"C": c, "sizes": len(s)} for c, s in sorted(per_level.items())],
           "reasons": [], "warnings": []}
    if out["points"] < cfg.min_points:
        out["reasons"].append(f"{out['points']} (N, D) points for a 5-parameter law (needs at least "
                              f"{cfg.min_points})")
    for key, what in (("distinct_N", "model sizes N"), ("distinct_D", "data budgets D")):
        if out[key] < cfg.min_distinct:
            out["reasons"].append(f"only {out[key]} distinct {what} (needs at least {cfg.min_distinct}: with "
                                  f"fewer, the {'alpha, A' if key == 'distinct_N' else 'beta, B'} term cannot be "
                                  "separated from E)")
    iso = sum(1 for lv in out["sizes_per_level"] if lv["sizes"] >= 3)
    if iso < 2:
        out["warnings"].append(f"{iso} compute level(s) with at least 3 sizes: no IsoFLOP power law "
                               "(plan the grid with grid.compute_levels / `vgpt sweep plan`)")
    return out


def bounds(boot: dict, tol: float) -> dict:
    """Parameters whose estimate, or whose bootstrap interval, reaches a bound of the fit's box."""
    th = boot["fit"].theta()
    q = (1 - boot["level"]) / 2
    thetas = boot.get("thetas")
    ci = np.quantile(thetas, [q, 1 - q], axis=0) if thetas is not None and len(thetas) else None
    at, ci_at = [], []
    for i, name in enumerate(THETA):
        lo, hi = BOUNDS[i]
        eps = tol * (hi - lo)
        log = name in ("A", "B", "E")
        for side, b in (("lower", lo), ("upper", hi)):
            shown = float(np.exp(b)) if log else b
            if abs(th[i] - b) <= eps:
                at.append({"param": name, "bound": side, "value": shown,
                           "why": f"{name} = {getattr(boot['fit'], name):.4g} is at the {side} bound of the fit's "
                                  f"box ({shown:.4g}): the box, not the data, stopped it"})
            elif ci is not None and abs(ci[0 if side == "lower" else 1][i] - b) <= eps:
                ci_at.append({"param": name, "bound": side, "value": shown,
                              "why": f"the {round(boot['level'] * 100)}% interval of {name} reaches the "
                                     f"{side} bound of the fit's box ({shown:.4g}): the data do not bound it"})
    return {"at_bound": at, "ci_at_bound": ci_at}


def leave_one_out(N, D, L, fit: LawFit) -> dict:
    """Refit without each point in turn (warm start from the full fit) and predict it."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    n = len(N)
    if n < 6:
        return {"points": n, "rmse_log": None, "note": "too few points"}
    thetas = fit_many(np.log(N), np.log(D), np.log(L), 1.0 - np.eye(n), fit.theta())
    pred = np.array([LawFit.from_theta(t).predict(N[i], D[i]) if np.all(np.isfinite(t)) else np.nan
                     for i, t in enumerate(thetas)])
    r = np.log(pred / L)
    r_in = np.log(fit.predict(N, D) / L)
    return {"points": n, "rmse_log": float(np.sqrt(np.nanmean(r ** 2))),
            "in_sample_rmse_log": float(np.sqrt(np.mean(r_in ** 2))),
            "max_abs_rel_err": float(np.nanmax(np.abs(pred / L - 1)))}


def extrapolation(points: list[dict], cfg, n_boot: int) -> dict:
    """Fit on every point but those of the largest compute level, predict those (with the bootstrap
    spread of the prediction) and compare with their measured losses."""
    levels = np.array(compute_levels(points))
    if len(set(levels.tolist())) < 2:
        return {"skipped": "one compute level: nothing to hold out"}
    top = levels.max()
    train = [p for p, c in zip(points, levels) if c < top]
    held = [p for p, c in zip(points, levels) if c == top]
    if len(train) < 6:
        return {"skipped": f"{len(train)} points below the largest compute level: too few to fit 5 parameters"}
    boot = bootstrap(*(np.array([p[k] for p in train], float) for k in ("N", "D", "eval_loss")),
                     n_boot=n_boot, seed=cfg.seed, level=cfg.level)
    f: LawFit = boot["fit"]
    q = (1 - cfg.level) / 2
    rows = []
    for p in held:
        pred = float(f.predict(p["N"], p["D"]))
        spread = [LawFit(*s).predict(p["N"], p["D"]) for s in boot["samples"]]
        lo, hi = (float(x) for x in np.quantile(spread, [q, 1 - q])) if spread else (np.nan, np.nan)
        rows.append({"size": p.get("size"), "N": p["N"], "D": p["D"], "flops": p["flops"], "measured": p["eval_loss"],
                     "predicted": pred, "interval": [lo, hi], "rel_err": pred / p["eval_loss"] - 1,
                     "inside": bool(lo <= p["eval_loss"] <= hi)})
    errs = np.abs([r["rel_err"] for r in rows])
    return {"held_out_level": float(top), "train_points": len(train), "held_out": rows,
            "mean_abs_rel_err": float(errs.mean()), "max_abs_rel_err": float(errs.max()),
            "fit": {p: getattr(f, p) for p in PARAMS}, "ci": boot["ci"]}


def assess(points: list[dict], boot: dict | None, cfg) -> dict:
    """Every check together: identifiable or not, and why."""
    out = design(points, cfg)
    if boot is not None:
        b = bounds(boot, cfg.bound_tol)
        out.update(b)
        out["reasons"] += [x["why"] for x in b["at_bound"]]
        out["warnings"] += [x["why"] + " (weakly identified: the interval is cut by the box)" for x in b["ci_at_bound"]]
        out["loo"] = leave_one_out(*(np.array([p[k] for p in points], float) for k in ("N", "D", "eval_loss")),
                                   boot["fit"])
        loo = out["loo"]
        if loo.get("rmse_log") and loo["rmse_log"] > 3 * max(loo["in_sample_rmse_log"], 1e-4):
            out["warnings"].append(f"leave-one-out error (RMS log {loo['rmse_log']:.3g}) is over 3x the in-sample "
                                   f"error ({loo['in_sample_rmse_log']:.3g}): single points move the fit")
    out["identifiable"] = not out["reasons"]
    return out
