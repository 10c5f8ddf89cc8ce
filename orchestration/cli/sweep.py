"""`vgpt sweep plan|run|fit --config F`: the scaling-law sweep (orchestration/sweep/runner.py).

plan: the trials of the grid (steps per compute level and size, their FLOPs), nothing run;
run: every trial of the grid on Ray, resumable; fit: L(N, D) with identifiability checks,
IsoFLOP power laws, extrapolation check, lr and batch laws, and compute-optimal N, D.
"""
from __future__ import annotations

from jobconfig.loader import load_config
from orchestration.cli import OVERRIDE_FORM, reports_bad_input, verb_parser
from orchestration.sweep.config import SweepConfig
from orchestration.sweep.plan import report_plan
from orchestration.sweep.runner import fit_sweep, run_sweep
from orchestration.sweep.trial import plan


@reports_bad_input("sweep")
def main(argv: list[str]) -> int:
    parser = verb_parser("sweep", __doc__, SweepConfig)
    parser.add_argument("action", choices=["plan", "run", "fit"])
    parser.add_argument("--config", required=True, help=f"a sweep YAML (configs/sweep/*.yaml); {OVERRIDE_FORM} "
                        "arguments override its keys (listed below)")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, rest, cls=SweepConfig)
    if args.action == "plan":
        report_plan(plan(cfg))  # strict: a bad grid fails here
        return 0
    return run_sweep(cfg) if args.action == "run" else fit_sweep(cfg)
