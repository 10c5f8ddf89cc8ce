"""Curriculum files: `stages: [files or inline mappings]` plus sections shared by every stage.

Each stage's sections override the shared ones, and command-line overrides beat
both. `plan_stages` loads and validates every stage before anything runs, so a
bad key in stage 4 fails in the first second, not after stage 3.
"""
from __future__ import annotations

from pathlib import Path

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import CONFIG_ROOT, build, deep_merge, parse_overrides, read_yaml


def _resolve(path: str, relative_to: Path) -> Path:
    p = Path(path)
    for cand in (p, relative_to / p, CONFIG_ROOT / p):
        if cand.is_file():
            return cand
    raise ConfigError(f"stages: {path!r} not found (looked next to {relative_to} and in {CONFIG_ROOT})")


def plan_stages(config: str, overrides: list[str], only_stage: int | None) -> list[tuple[str, JobConfig]]:
    """[(stage name, validated config)] in run order."""
    path = Path(config)
    raw = read_yaml(path)
    pairs = parse_overrides(overrides)
    if "stages" in raw:
        plan = _stages(path, raw, pairs)
    else:
        plan = [(path.stem, build(JobConfig, raw, pairs, f"in {path}"))]
    # checked here for every caller (train, launch): a file of one stage has stage 1 only
    if only_stage is not None and not 1 <= only_stage <= len(plan):
        raise ConfigError(f"--stage: got {only_stage}, expected 1..{len(plan)}")
    return plan


def _stages(path: Path, raw: dict, pairs: list) -> list[tuple[str, JobConfig]]:
    """Every stage of a curriculum file: its stage's sections merged over the shared ones."""
    shared = {k: v for k, v in raw.items() if k != "stages"}
    files = raw["stages"]
    if not isinstance(files, list) or not files:
        raise ConfigError(f"{path}: stages: expected a non-empty list of stage config files")
    plan = []
    for i, f in enumerate(files, start=1):
        # a stage is a file of sections, or those sections written inline
        stage_file = path if isinstance(f, dict) else _resolve(f, path.parent)
        try:
            stage_raw = f if isinstance(f, dict) else read_yaml(stage_file)
        except ConfigError as e:
            raise ConfigError(f"{e} (stage {i}: {stage_file})") from None
        # errors name the stage's file, or the command-line override the bad value came from
        cfg = build(JobConfig, deep_merge(shared, stage_raw), pairs, f"stage {i}: {stage_file}")
        plan.append((f"stage{i}", cfg))
    return plan
