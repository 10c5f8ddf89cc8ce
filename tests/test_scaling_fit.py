"""The scaling-law fitter recovers a known law, and its helpers behave. (Interval coverage in 9 of 10
seeds is tested on an IsoFLOP grid, the grid a sweep is planned on: test_sweep_identifiability.py.)"""
from __future__ import annotations

import numpy as np

from orchestration.sweep.fit import PARAMS, LawFit, compute_optimal_ci, fit_law, isoflop_minima

TRUE = LawFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic_points(seed: int, sigma: float = 0.01):
    rng = np.random.default_rng(seed)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 7)))
    L = TRUE.predict(N, D) * np.exp(rng.normal(0, sigma, N.shape))
    return N, D, L


def test_noise_free_points_give_the_law_back():
    N, D, _ = synthetic_points(0)
    f = fit_law(N, D, TRUE.predict(N, D))
    for p in PARAMS:
        assert np.isclose(getattr(f, p), getattr(TRUE, p), rtol=1e-3), (p, getattr(f, p))


def test_compute_optimal_matches_a_numerical_minimum():
    C = 1e21
    n_opt, d_opt = TRUE.compute_optimal(C)
    ns = np.geomspace(n_opt / 10, n_opt * 10, 20001)
    best = ns[np.argmin(TRUE.predict(ns, C / (6 * ns)))]
    assert np.isclose(best, n_opt, rtol=1e-3) and np.isclose(6 * n_opt * d_opt, C)
    boot = {"fit": TRUE, "samples": np.array([[getattr(TRUE, p) for p in PARAMS]] * 3), "level": 0.95}
    o = compute_optimal_ci(boot, C)
    assert o["N_ci"][0] <= o["N_opt"] <= o["N_ci"][1]


def test_isoflop_vertex_near_the_true_optimum():
    sizes = np.geomspace(1e7, 1e10, 9)
    curves = {}
    for n in sizes:
        D = np.geomspace(1e8, 1e13, 200)
        curves[float(n)] = (6 * n * D, TRUE.predict(n, D))
    levels = isoflop_minima(curves, levels=3)
    found = [lv for lv in levels if lv["N_opt"]]
    assert found
    for lv in found:
        true_n, _ = TRUE.compute_optimal(lv["C"])
        assert abs(np.log10(lv["N_opt"] / true_n)) < 0.3
