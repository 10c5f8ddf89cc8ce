"""`vgpt sweep run|fit --config F`: the scaling-law sweep (orchestration/sweep/runner.py).

run: every trial of the grid on Ray, resumable; fit: L(N, D), IsoFLOP and compute-optimal N, D.
"""
from __future__ import annotations

import argparse

from jobconfig.loader import load_config
from orchestration.cli import reports_bad_input
from orchestration.sweep.config import SweepConfig
from orchestration.sweep.runner import fit_sweep, run_sweep


@reports_bad_input("sweep")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "fit"])
    parser.add_argument("--config", required=True, help="a configs/sweep/*.yaml")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, rest, cls=SweepConfig)
    return run_sweep(cfg) if args.action == "run" else fit_sweep(cfg)
