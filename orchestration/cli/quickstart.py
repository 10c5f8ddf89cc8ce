"""`vgpt quickstart [--workdir runs/quickstart] [--reduced] [--nproc 1]`: the whole system on
one CPU box, from videos to predicted frames (orchestration/quickstart.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from orchestration.cli import reports_bad_input, verb_parser
from orchestration.quickstart import FULL, REDUCED, run


@reports_bad_input("quickstart")
def main(argv: list[str]) -> int:
    parser = verb_parser("quickstart", __doc__)
    parser.add_argument("--workdir", default="runs/quickstart", help="where everything is written and "
                                                                    "resumed from (default runs/quickstart)")
    parser.add_argument("--reduced", action="store_true", help="fewer videos and steps (the test suite's mode)")
    parser.add_argument("--nproc", type=int, default=1, help="training processes (torchrun on loopback)")
    args = parser.parse_args(argv)
    try:
        run(Path(args.workdir), REDUCED if args.reduced else FULL, args.nproc)
    except RuntimeError as e:  # a step's command failed; it printed why
        print(f"vgpt quickstart: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
