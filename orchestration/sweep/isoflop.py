"""IsoFLOP minima on planned compute levels (Chinchilla approach 2), their power laws, and how they
compare with the parametric fit.

Per compute level with at least three sizes: a parabola of the held-out loss in
log N through the level's points (the best lr x batch trial per size); its
vertex is N_opt(C) when it is a minimum inside the sampled sizes, and D_opt(C)
is read off the level's own line (log D linear in log N through its points, so
attention FLOPs are accounted for as the runner counts them). Across levels:
N_opt = k C^a and D_opt = k' C^b by least squares in log-log. Intervals come
from a residual bootstrap (the parabolas' pooled residuals, or the parametric
fit's log residuals when the parabolas leave no degrees of freedom), all
resamples in one vectorised polyfit.

Comparison: the parametric law's minimum along each level's own line, and its
exponent beta/(alpha+beta) (bootstrap interval) next to the IsoFLOP exponent; a
level whose parametric N_opt falls outside the IsoFLOP interval, or exponent
intervals that do not overlap, are reported as disagreement.
"""
from __future__ import annotations

import numpy as np

from orchestration.sweep.fit import SINGLE_BLAS_THREAD, LawFit


def _vertices(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Vertex in x of parabolas through columns of Y [n, B] (x sorted); NaN where there is no interior
    minimum: a parabola opening down, a vertex outside the sampled sizes, or a lowest loss measured at
    the smallest or largest size (a parabola through a lopsided curve can put its vertex inside anyway)."""
    k2, k1, _ = np.polyfit(x, Y, 2)
    v = np.where(k2 > 0, -k1 / (2 * np.where(k2 > 0, k2, 1)), np.nan)
    low = np.argmin(Y, axis=0)
    return np.where((v >= x.min()) & (v <= x.max()) & (low > 0) & (low < len(x) - 1), v, np.nan)


@SINGLE_BLAS_THREAD
def isoflop_levels(points: list[dict], levels: list[float], fit: LawFit | None, n_boot: int = 200, seed: int = 0,
                   level: float = 0.95) -> dict:
    """IsoFLOP minima per level, with intervals, and the power laws across levels."""
    by: dict[float, list[dict]] = {}
    for p, c in zip(points, levels):
        by.setdefault(c, []).append(p)
    used = {c: sorted(ps, key=lambda p: p["N"]) for c, ps in sorted(by.items()) if len({p["N"] for p in ps}) >= 3}
    out = {"levels": [], "law": {}, "noise": None}
    if not used:
        return out
    rng = np.random.default_rng(seed)
    q = (1 - level) / 2
    fits, resid, dof = {}, [], 0
    for c, ps in used.items():
        x, y = np.log([p["N"] for p in ps]), np.array([p["eval_loss"] for p in ps])
        k = np.polyfit(x, y, 2)
        fits[c] = (x, y, k, np.polyfit(x, np.log([p["D"] for p in ps]), 1))
        resid += list(y - np.polyval(k, x))
        dof += len(x) - 3
    if dof >= 2:
        noise = np.array(resid) * np.sqrt(len(resid) / dof)
        out["noise"] = "pooled residuals of the IsoFLOP parabolas"
    elif fit is not None:
        allp = [p for ps in used.values() for p in ps]
        noise = np.log([p["eval_loss"] / fit.predict(p["N"], p["D"]) for p in allp])  # relative, applied as such
        out["noise"] = "log residuals of the parametric fit (the parabolas leave no degrees of freedom)"
    else:
        noise = np.zeros(1)
        out["noise"] = "none (no degrees of freedom): intervals are points"
    rel = out["noise"].startswith("log")
    boot_v = {}
    for c, (x, y, k, dline) in fits.items():
        e = rng.choice(noise, size=(len(x), n_boot))
        Y = y[:, None] * np.exp(e) if rel else y[:, None] + e
        boot_v[c] = _vertices(x, Y)
        v = _vertices(x, y[:, None])[0]
        row = {"C": float(c), "N": [float(np.exp(a)) for a in x], "L": [float(a) for a in y],
               "D": [float(p["D"]) for p in used[c]], "parabola": [float(a) for a in k], "N_opt": None, "D_opt": None,
               "L_min": None, "N_ci": None, "D_ci": None}
        if np.isfinite(v):
            ok = boot_v[c][np.isfinite(boot_v[c])]
            row.update(N_opt=float(np.exp(v)), D_opt=float(np.exp(np.polyval(dline, v))),
                       L_min=float(np.polyval(k, v)), boot_valid=float(len(ok) / n_boot))
            if len(ok):
                lo, hi = np.quantile(ok, [q, 1 - q])
                row["N_ci"] = [float(np.exp(lo)), float(np.exp(hi))]
                row["D_ci"] = sorted(float(np.exp(np.polyval(dline, a))) for a in (lo, hi))
        if fit is not None:  # the parametric law's minimum along this level's own line
            xs = np.linspace(x.min() - 1.0, x.max() + 1.0, 801)
            ls = fit.predict(np.exp(xs), np.exp(np.polyval(dline, xs)))
            j = int(np.argmin(ls))
            row["parametric_N_opt"] = float(np.exp(xs[j]))
            row["parametric_L_min"] = float(ls[j])
            row["agree"] = bool(row["N_ci"] and row["N_ci"][0] <= row["parametric_N_opt"] <= row["N_ci"][1]) \
                if row["N_opt"] else None
        out["levels"].append(row)
    good = [r for r in out["levels"] if r["N_opt"]]
    if len(good) >= 2:
        lc = np.log([r["C"] for r in good])
        for name, key in (("N_opt", "N_opt"), ("D_opt", "D_opt")):
            y = np.log([r[key] for r in good])
            a, b = np.polyfit(lc, y, 1)
            law = {"exponent": float(a), "coef": float(np.exp(b)), "levels": len(good), "ci": None}
            if name == "N_opt":
                V = np.stack([boot_v[r["C"]] for r in good])  # [levels, B]
                keep = np.all(np.isfinite(V), axis=0)
                if keep.sum() >= 10:
                    slopes = np.polyfit(lc, V[:, keep], 1)[0]
                    law["ci"] = [float(s) for s in np.quantile(slopes, [q, 1 - q])]
            out["law"][name] = law
        if out["law"]["N_opt"]["ci"]:  # D_opt = C / (cost per token * N_opt): the exponent interval mirrors N's
            lo, hi = out["law"]["N_opt"]["ci"]
            shift = out["law"]["D_opt"]["exponent"] + out["law"]["N_opt"]["exponent"]
            out["law"]["D_opt"]["ci"] = [shift - hi, shift - lo]
    return out


def compare(iso: dict, boot: dict) -> dict:
    """Parametric vs IsoFLOP: the N_opt exponent beta/(alpha+beta) with its bootstrap interval, and per
    level whether the parametric N_opt on the level's line lies in the IsoFLOP interval."""
    f: LawFit = boot["fit"]
    q = (1 - boot["level"]) / 2
    s = boot["samples"]
    ex = s[:, 4] / (s[:, 3] + s[:, 4]) if len(s) else np.array([])
    out = {"parametric_exponent": float(f.beta / (f.alpha + f.beta)),
           "parametric_ci": [float(x) for x in np.quantile(ex, [q, 1 - q])] if len(ex) else None,
           "isoflop_exponent": None, "isoflop_ci": None, "disagreements": []}
    law = iso.get("law", {}).get("N_opt")
    if law:
        out["isoflop_exponent"], out["isoflop_ci"] = law["exponent"], law["ci"]
        a, b = out["parametric_ci"] or [out["parametric_exponent"]] * 2
        c, d = law["ci"] or [law["exponent"]] * 2
        if b < c or d < a:
            out["disagreements"].append(f"N_opt exponent: parametric {out['parametric_exponent']:.3f} "
                                        f"[{a:.3f}, {b:.3f}] vs IsoFLOP {law['exponent']:.3f} [{c:.3f}, {d:.3f}]: "
                                        "the intervals do not overlap")
    for r in iso.get("levels", []):
        if r.get("agree") is False:
            ci = r["N_ci"] or [float("nan")] * 2
            out["disagreements"].append(f"C = {r['C']:.3g}: parametric N_opt {r['parametric_N_opt']:.3g} is outside "
                                        f"the IsoFLOP interval [{ci[0]:.3g}, {ci[1]:.3g}] "
                                        f"(vertex {r['N_opt']:.3g})")
    out["agree"] = not out["disagreements"] if (law or iso.get("levels")) else None
    return out
