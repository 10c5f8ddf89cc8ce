"""The held-out evaluation's share of a run's time, per stage, from its metrics.jsonl.

    python bench/eval_share.py RUN [RUN ...]

RUN: a stage's out_dir (holding metrics.jsonl), a curriculum's out_dir (stage*/metrics.jsonl) or a
quickstart work dir (train/stage*/metrics.jsonl). The trainer records `eval_time_share` on every
evaluation step (eval.every): evaluation seconds so far over the run's seconds so far; the last one is
the stage's. Prints one line per stage with that ratio and the goal (issue 27: under 0.10 at the
quickstart's settings). A report, asserted nowhere (tests/test_quickstart.py checks the share).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GOAL = 0.10


def stage_files(run: Path) -> list[Path]:
    for pattern in ("metrics.jsonl", "stage*/metrics.jsonl", "train/stage*/metrics.jsonl"):
        if found := sorted(run.glob(pattern)):
            return found
    return []


def share(metrics: Path) -> tuple[float, int] | None:
    """(the last eval_time_share, evaluations) of one stage, or None when it never evaluated."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"eval_time_share"' in x]
    return (rows[-1]["eval_time_share"], len(rows)) if rows else None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for run in map(Path, argv):
        files = stage_files(run)
        if not files:
            print(f"{run}: no metrics.jsonl", file=sys.stderr)
            return 2
        for f in files:
            got = share(f)
            name = f.parent.name
            if got is None:
                print(f"{name:10s} no held-out evaluation (eval.every = 0)")
            else:
                ratio, n = got
                print(f"{name:10s} evaluation/run time ratio {ratio:.4f} over {n} evaluations "
                      f"({'under' if ratio < GOAL else 'OVER'} the {GOAL:.2f} goal)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
