"""`vgpt sweep fit`'s outputs: report.md, fit.json and PNG plots (matplotlib Agg) from analysis.analyse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from orchestration.sweep.analysis import to_json
from orchestration.sweep.fit import HUBER_DELTA, PARAMS, LawFit
from orchestration.sweep.lr_batch import AXES, INTERIOR, MIN_INTERIOR_SHARE, MIN_VALUES


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, a: dict) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    trials, fit = a["_pts"], a["_boot"]["fit"]
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

    iso = a["isoflop"]["levels"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, lv in enumerate(iso):
        c = plt.cm.plasma(i / max(1, len(iso) - 1))
        ax.scatter(lv["N"], lv["L"], color=c, label=f"C={lv['C']:.3g}")
        xs = np.linspace(np.log(min(lv["N"])), np.log(max(lv["N"])), 50)
        ax.plot(np.exp(xs), np.polyval(lv["parabola"], xs), color=c, lw=1)
        if lv["N_opt"]:
            ax.scatter([lv["N_opt"]], [lv["L_min"]], color=c, marker="*", s=120, edgecolor="k")
            if lv.get("N_ci"):
                ax.plot(lv["N_ci"], [lv["L_min"]] * 2, color=c, lw=3, alpha=0.5)
        if lv.get("parametric_N_opt"):
            ax.axvline(lv["parametric_N_opt"], color=c, ls=":", lw=1)
    ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss",
           title="IsoFLOP curves (star: vertex, bar: interval, dotted: parametric)")
    if iso:
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    cs = np.array([t["flops"] for t in trials])
    if a["identifiable"]:
        grid = np.geomspace(cs.min() / 3, cs.max() * 30, 60)
        n_opt, d_opt = fit.compute_optimal(grid)
        ax.plot(grid, fit.predict(n_opt, d_opt), "k-", label="fitted compute-optimal frontier")
    ax.scatter(cs, [t["eval_loss"] for t in trials], c=[colours[t["N"]] for t in trials], label="trials")
    ex = a["extrapolation"]
    if ex.get("held_out"):
        h = ex["held_out"]
        yerr = np.abs(np.array([[r["interval"][0], r["interval"][1]] for r in h]).T -
                      np.array([r["predicted"] for r in h]))
        ax.errorbar([r["flops"] for r in h], [r["predicted"] for r in h], yerr=yerr, fmt="rx", capsize=3,
                    label=f"held-out largest C: predicted (mean |err| {ex['mean_abs_rel_err']:.1%})")
        ax.scatter([r["flops"] for r in h], [r["measured"] for r in h], facecolors="none", edgecolors="r", s=80,
                   label="held-out largest C: measured")
    ax.set(xscale="log", yscale="log", xlabel="FLOPs (C = 6ND for the frontier)", ylabel="held-out loss",
           title="Fitted frontier" if a["identifiable"] else "NOT IDENTIFIABLE: no frontier drawn")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "frontier.png"))

    fig = lr_batch_figure(a["lr_batch"])
    if fig is not None:
        paths.append(_save(fig, out_dir / "lr_batch.png"))
    return paths


def lr_batch_figure(lb: dict):
    """The optimal lr and batch per (N, D) point (hollow: not interior, so not an optimum), with the fitted
    law joined along each compute level (or budget) only where the law is determined; None without a
    sub-grid."""
    import matplotlib.pyplot as plt

    o = lb["optima"]
    if not any(r[f"{name}_values"] > 1 for r in o for name, _ in AXES):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (name, _) in zip(axes, AXES):
        law = lb["laws"][name]
        logd = np.log([r["D"] for r in o])
        inner = np.array([r[f"{name}_where"] == INTERIOR for r in o])
        x, y = np.array([r["N"] for r in o]), np.array([r[f"{name}_opt"] for r in o])
        if inner.any():
            ax.scatter(x[inner], y[inner], c=logd[inner], vmin=logd.min(), vmax=logd.max())
        if not inner.all():
            ax.scatter(x[~inner], y[~inner], facecolors="none", edgecolors="0.4",
                       label="best grid value, not interior")
        if law.get("determined"):
            for i, g in enumerate(sorted({r["group"] for r in o})):
                rs = sorted((r for r in o if r["group"] == g), key=lambda r: r["N"])
                pred = [law["coef"] * r["N"] ** law["exp_N"] * r["D"] ** law.get("exp_D", 0.0) for r in rs]
                ax.plot([r["N"] for r in rs], pred, "k-", lw=1, label=None if i else "fitted law")
            title = f"optimal {name}: law fitted on {law['fitted_on']} of {law['points']} points"
        else:
            title = f"optimal {name}: NOT DETERMINED (no law drawn)"
        ax.set(xscale="log", yscale="log", xlabel="parameters N (colour: log D)", ylabel=f"optimal {name}",
               title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def _ci(x) -> str:
    return f"[{x[0]:.3g}, {x[1]:.3g}]" if x else "-"


def write_report(path: Path, a: dict, plots: list[Path]) -> Path:
    fit: LawFit = a["_boot"]["fit"]
    pct = round(a["level"] * 100)
    idf = a["identifiability"]
    lines = ["# Scaling-law fit", ""]
    if a["identifiable"]:
        warn = f" ({len(idf['warnings'])} warning(s) below: read them before trusting the numbers)" \
            if idf["warnings"] else ""
        lines += [(f"**Identifiable**: enough points, sizes and data budgets, and no estimate at a bound of the "
                   f"fit's box{warn}."), ""]
    else:
        lines += [("**NOT IDENTIFIABLE: this sweep does not determine L(N, D); no compute-optimal allocation is "
                   "recommended.** Why:"), ""] + [f"- {r}" for r in a["not_identifiable_because"]] + [""]
    lines += [(f"{a['trials']} trials, {a['points']} (N, D) points (best lr x batch each); L(N, D) = E + A/N^alpha "
               f"+ B/D^beta, Huber (delta={HUBER_DELTA}) on log residuals, L-BFGS from a grid of starts; "
               f"{a['bootstrap']} bootstrap resamples."), "",
              f"| parameter | estimate | {pct}% interval | flag |", "|---|---|---|---|"]
    flags = {x["param"]: f"AT {x['bound'].upper()} BOUND" for x in idf.get("at_bound", [])}
    for x in idf.get("ci_at_bound", []):
        flags.setdefault(x["param"], f"interval reaches {x['bound']} bound")
    for p in PARAMS:
        lo, hi = a["ci"][p]
        lines.append(f"| {p} | {getattr(fit, p):.4g} | [{lo:.4g}, {hi:.4g}] | {flags.get(p, '')} |")
    loo = idf.get("loo", {})
    lines += ["", "## Identifiability", "",
              (f"- points: {idf['points']}; distinct model sizes N: {idf['distinct_N']}; distinct data budgets D: "
               f"{idf['distinct_D']}"),
              "- sizes per compute level: " + ", ".join(f"{lv['C']:.3g}: {lv['sizes']}" for lv in
                                                        idf["sizes_per_level"])]
    if loo.get("rmse_log") is not None:
        lines.append(f"- leave-one-out prediction error: RMS log {loo['rmse_log']:.4g} (in-sample "
                     f"{loo['in_sample_rmse_log']:.4g}), worst {loo['max_abs_rel_err']:.2%}")
    lines += [f"- warning: {w}" for w in idf["warnings"]]

    ex = a["extrapolation"]
    lines += ["", "## Extrapolation check (fit without the largest compute level, predict it)", ""]
    if ex.get("skipped"):
        lines.append(f"Skipped: {ex['skipped']}.")
    else:
        lines += [(f"Fitted on {ex['train_points']} points below C = {ex['held_out_level']:.3g}; mean |error| "
                   f"{ex['mean_abs_rel_err']:.2%}, worst {ex['max_abs_rel_err']:.2%}."), "",
                  f"| size | N | D | predicted | {pct}% interval | measured | error |", "|---|---|---|---|---|---|---|"]
        for r in ex["held_out"]:
            lines.append(f"| {r['size']} | {r['N']:.3g} | {r['D']:.3g} | {r['predicted']:.5f} | "
                         f"[{r['interval'][0]:.5f}, {r['interval'][1]:.5f}] | {r['measured']:.5f} | "
                         f"{r['rel_err']:+.2%} |")

    lines += ["", "## Compute-optimal allocation (C = 6ND)", ""]
    if not a["compute_optimal"]:
        lines.append("None: the law is not identifiable (see above).")
    else:
        lines += [f"| C (FLOPs) | N_opt | N {pct}% | D_opt (tokens) | D {pct}% |", "|---|---|---|---|---|"]
        for o in a["compute_optimal"]:
            lines.append(f"| {o['C']:.3g} | {o['N_opt']:.3g} | {_ci(o['N_ci'])} | {o['D_opt']:.3g} | {_ci(o['D_ci'])} |")

    iso = a["isoflop"]
    lines += ["", f"## IsoFLOP minima ({iso['source']})", ""]
    if not iso["levels"]:
        lines.append("Too few sizes share a compute level (needs 3): plan the grid with grid.compute_levels.")
    for lv in iso["levels"]:
        if lv["N_opt"]:
            where = f"N_opt = {lv['N_opt']:.3g} {_ci(lv.get('N_ci'))}, D_opt = {lv['D_opt']:.3g}, L = {lv['L_min']:.4g}" \
                if lv.get("D_opt") else f"N_opt = {lv['N_opt']:.3g}, L = {lv['L_min']:.4g}"
        else:
            where = "no interior minimum (the optimum lies outside the sampled sizes)"
        par = f"; parametric N_opt on this line {lv['parametric_N_opt']:.3g}" if lv.get("parametric_N_opt") else ""
        lines.append(f"- C = {lv['C']:.3g}: {where}{par}")
    for name, law in iso.get("law", {}).items():
        lines.append(f"- {name}(C) = {law['coef']:.3g} C^{law['exponent']:.3f}, exponent {pct}% {_ci(law['ci'])} "
                     f"({law['levels']} levels)")
    ag = a["agreement"]
    lines += ["", "## Parametric vs IsoFLOP", "",
              f"N_opt exponent: parametric beta/(alpha+beta) = {ag['parametric_exponent']:.3f} "
              f"{_ci(ag['parametric_ci'])}; IsoFLOP "
              + (f"{ag['isoflop_exponent']:.3f} {_ci(ag['isoflop_ci'])}" if ag["isoflop_exponent"] is not None
                 else "none (fewer than 2 levels with an interior minimum)") + ".", ""]
    if ag["disagreements"]:
        lines += ["**They disagree:**", ""] + [f"- {d}" for d in ag["disagreements"]]
    elif ag["agree"]:
        lines.append("They agree (every level's parametric N_opt inside its IsoFLOP interval; exponent intervals "
                     "overlap).")

    lines += lr_batch_lines(a["lr_batch"], pct)

    lines += ["", "## Points (best trial per (N, D))", "",
              "| key | size | N | D | FLOPs | level | lr | batch | held-out loss |", "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(a["_pts"], key=lambda t: (t["N"], t["D"])):
        lv = f"{t['level']:.3g}" if t.get("level") else "-"
        lines.append(f"| {t.get('key', '')} | {t['size']} | {t['N']:.3g} | {t['D']:.3g} | {t['flops']:.3g} | {lv} | "
                     f"{t['lr']:.3g} | {t['batch_size']} | {t['eval_loss']:.5f} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
    return path


def lr_batch_lines(lb: dict, pct: int) -> list[str]:
    """The report's "Learning rate and batch size" section: each law, or why it is not determined, and the
    optimum per point with where it lies."""
    lines = ["", "## Learning rate and batch size", "",
             ("Per (N, D) point the best trial of the lr x batch sub-grid is what the law above is fitted on. "
              f"An optimum is interior when its axis has at least {MIN_VALUES} values at the point and the best "
              "is neither end (then: the parabola vertex in log around it); a law is fitted only when more than "
              f"{MIN_INTERIOR_SHARE:.0%} of the points have an interior optimum, on those points alone."), ""]
    for name, _ in AXES:
        law = lb["laws"][name]
        if not law["determined"]:
            lines.append(f"- optimal {name}: **NOT DETERMINED**: {'; '.join(law['not_determined_because'])}")
            continue
        terms = " ".join(f"{v}^{law[f'exp_{v}']:.3f} {_ci(law[f'exp_{v}_ci'])}" for v in law["in"])
        left = law["points"] - law["fitted_on"]
        left = (f"; {left} left out ({law['at_edge']} at a sub-grid edge, {law['too_few_values']} with fewer than "
                f"{MIN_VALUES} values)") if left else ""
        lines.append(f"- optimal {name} = {law['coef']:.3g} {_ci(law['coef_ci'])} x {terms} ({pct}% intervals, "
                     f"{law['dof']} dof, RMS log residual {law['rmse_log']:.3g}; fitted on the {law['fitted_on']} of "
                     f"{law['points']} points with an interior optimum{left})"
                     f"{'; ' + law['note'] if law.get('note') else ''}")

    def opt(o, name):
        return f"{o[f'{name}_opt']:.3g}" + ("" if o[f"{name}_where"] == INTERIOR else f" ({o[f'{name}_where']})")

    lines += ["", "| size | N | D | trials | best lr | best batch | lr_opt | batch_opt | loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for o in sorted(lb["optima"], key=lambda o: (o["N"], o["D"])):
        lines.append(f"| {o['size']} | {o['N']:.3g} | {o['D']:.3g} | {o['trials']} | {o['best_lr']:.3g} | "
                     f"{o['best_batch']} | {opt(o, 'lr')} | {opt(o, 'batch')} | {o['best_loss']:.5f} |")
    return lines


def write_outputs(out: Path, a: dict) -> Path:
    """report.md, fit.json and the plots into `out`; returns the report's path."""
    plots = write_plots(out, a)
    report = write_report(out / "report.md", a, plots)
    (out / "fit.json").write_text(json.dumps(to_json(a), indent=1, default=_jsonable))
    return report


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.bool_,)):
        return bool(x)
    raise TypeError(f"not JSON: {type(x)}")
