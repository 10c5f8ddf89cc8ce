"""`vgpt sweep fit`'s analysis of a sweep's results, as one JSON-able dict (fit.json).

Best trial per (N, D) point (lr_batch.py) -> L(N, D) with bootstrap intervals
(fit.py) -> identifiability (identifiability.py) -> IsoFLOP minima and their
power laws, compared with the parametric fit (isoflop.py) -> extrapolation to
the largest compute level -> optimal-lr and optimal-batch laws, each fitted only where the
sub-grid determines it (else `not_determined_because`, lr_batch.py). A compute-optimal
recommendation is made only when the law is identifiable.
"""
from __future__ import annotations

import numpy as np

from orchestration.sweep import fit as sf
from orchestration.sweep.identifiability import assess, compute_levels, extrapolation
from orchestration.sweep.isoflop import compare, isoflop_levels
from orchestration.sweep.lr_batch import best_per_point, lr_batch_laws, subgrid_optima


def _smooth(xs: list[float], window: int = 3) -> list[float]:
    return [sum(xs[max(0, i - window + 1): i + 1]) / len(xs[max(0, i - window + 1): i + 1]) for i in range(len(xs))]


def _curve_minima(pts: list[dict]) -> list[dict]:
    """Sweeps without planned levels: IsoFLOP minima from the train-loss curves (fit.isoflop_minima)."""
    curves = {}
    for r in sorted(pts, key=lambda r: r["D"]):  # longest run per size
        if r.get("curve"):
            curves[float(r["N"])] = ([p["flops"] for p in r["curve"]], _smooth([p["loss"] for p in r["curve"]]))
    return sf.isoflop_minima(curves)


def analyse(results: list[dict], cfg, progress=None) -> dict:
    """Everything the report says, from the result records of a sweep. `cfg`: the FitConfig."""
    pts = best_per_point(results)
    N, D, L = (np.array([p[k] for p in pts], float) for k in ("N", "D", "eval_loss"))
    boot = sf.bootstrap(N, D, L, n_boot=cfg.bootstrap, seed=cfg.seed, level=cfg.level, progress=progress)
    ident = assess(pts, boot, cfg)
    f: sf.LawFit = boot["fit"]
    iso = isoflop_levels(pts, compute_levels(pts), f, n_boot=max(200, cfg.bootstrap), seed=cfg.seed, level=cfg.level)
    iso["source"] = "held-out losses of the best trial per size, per compute level"
    if not iso["levels"]:
        iso["levels"] = _curve_minima(pts)
        iso["source"] = "train-loss curves interpolated at shared compute (no level has 3 sizes)"
    agreement = compare(iso, boot)
    if agreement["disagreements"]:
        ident["warnings"].append("the parametric fit and the IsoFLOP minima disagree (see 'Parametric vs IsoFLOP')")
    optima = [sf.compute_optimal_ci(boot, c) for c in cfg.compute_budgets] if ident["identifiable"] else []
    extra = extrapolation(pts, cfg, n_boot=max(20, cfg.bootstrap // 2))
    sub = subgrid_optima(results)
    return {
        "identifiable": ident["identifiable"],
        "not_identifiable_because": ident["reasons"],
        "identifiability": ident,
        "params": {p: getattr(f, p) for p in sf.PARAMS}, "ci": boot["ci"], "level": boot["level"],
        "bootstrap": len(boot["samples"]), "points": len(pts), "trials": len(results),
        "compute_optimal": optima,
        "recommendation": None if not ident["identifiable"] else "compute_optimal",
        "isoflop": iso, "agreement": agreement, "extrapolation": extra,
        "lr_batch": {"optima": sub, "laws": lr_batch_laws(sub, cfg.level)},
        "point_records": [{k: p.get(k) for k in ("key", "size", "N", "D", "flops", "level", "lr", "batch_size",
                                                 "eval_loss")} for p in pts],
        "_boot": boot, "_pts": pts,
    }


def to_json(analysis: dict) -> dict:
    """The analysis without its in-memory objects (the bootstrap arrays, the full trial records)."""
    return {k: v for k, v in analysis.items() if not k.startswith("_")}
