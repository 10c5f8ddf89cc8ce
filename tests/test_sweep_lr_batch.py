"""Optimal-lr and optimal-batch laws are recovered from a noisy lr x batch sub-grid (issue 20,
acceptance 4), and the loss law is fitted on the best trial of each sub-grid."""
from __future__ import annotations

import numpy as np

from orchestration.sweep.lr_batch import best_per_point, lr_batch_laws, subgrid_optima

LR = (3e-3, -0.4, 0.15)  # lr* = c (N/1e6)^p (D/1e9)^q
BS = (64.0, 0.1, 0.35)


def law(c, N, D):
    return c[0] * (N / 1e6) ** c[1] * (D / 1e9) ** c[2]


def subgrid_results(seed: int, sigma: float = 0.002) -> list[dict]:
    rng = np.random.default_rng(seed)
    lrs = 3e-3 * 2.0 ** np.arange(-5, 5)
    batches = 64 * 2.0 ** np.arange(-4, 5)
    out = []
    for N in np.geomspace(1e6, 1e8, 4):
        for D in np.geomspace(1e9, 1e11, 4):
            lr_opt, b_opt = law(LR, N, D), law(BS, N, D)
            base = 1.7 + 400 / N ** 0.34 + 400 / D ** 0.28
            for lr in lrs:
                for b in batches:
                    pen = 0.02 * np.log2(lr / lr_opt) ** 2 + 0.01 * np.log2(b / b_opt) ** 2
                    out.append({"size": f"n{N:.3g}", "budget": int(D), "level": None, "N": N, "D": D, "lr": float(lr),
                                "batch_size": int(b), "eval_loss": float(base * (1 + pen) * np.exp(rng.normal(0, sigma)))})
    return out


def test_lr_and_batch_laws_recovered_from_a_noisy_subgrid():
    hits = {"lr": 0, "batch": 0}
    for seed in range(10):
        results = subgrid_results(seed)
        optima = subgrid_optima(results)
        assert len(optima) == 16 and all(o["trials"] == 90 for o in optima)
        laws = lr_batch_laws(optima)
        for name, true in (("lr", LR), ("batch", BS)):
            fit = laws[name]
            assert fit["in"] == ["N", "D"]
            ok = all(fit[f"exp_{v}_ci"][0] <= t <= fit[f"exp_{v}_ci"][1] for v, t in zip("ND", true[1:]))
            ok &= abs(fit["exp_N"] - true[1]) < 0.05 and abs(fit["exp_D"] - true[2]) < 0.05
            ok &= abs(np.log(fit["coef"] * 1e6 ** fit["exp_N"] * 1e9 ** fit["exp_D"] / true[0])) < 0.2
            hits[name] += ok
    assert hits["lr"] >= 9 and hits["batch"] >= 9, hits


def test_law_is_fitted_on_the_best_trial_per_point():
    results = subgrid_results(0)
    best = best_per_point(results)
    assert len(best) == 16
    for b in best:
        same = [r["eval_loss"] for r in results if r["N"] == b["N"] and r["D"] == b["D"]]
        assert b["eval_loss"] == min(same)


def test_one_value_grid_says_there_is_no_law():
    results = [r for r in subgrid_results(0) if r["batch_size"] == 64]
    laws = lr_batch_laws(subgrid_optima(results))
    assert "skipped" in laws["batch"] and "exp_N" in laws["lr"]
