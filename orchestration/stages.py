"""A curriculum's stages chained for one `vgpt train`: where each writes, what it starts from, which are done.

Why one module: the train command runs (orchestration/cli/train.py) and
preflight checks (orchestration/preflight.py) the same stages, and both take
each stage's out_dir, init_from and "finished by an earlier invocation" from
here, so the two cannot disagree. jobconfig/curriculum.py builds and
validates the stages; chaining them needs where a run exports
(pretrain.checkpoint.export), a layer above jobconfig, hence this module.
"""
from __future__ import annotations

from pathlib import Path

from jobconfig.job import JobConfig
from pretrain.checkpoint.export import export_exists, export_path

Plan = list[tuple[str, JobConfig]]


def chain_stages(plan: Plan) -> Plan:
    """The plan with each stage's final out_dir and init_from, set in place: a curriculum's stage
    writes under `<out_dir>/<stage name>` and, unless it names its own, starts from the previous
    stage's export. A plan of one stage is returned as it is."""
    if len(plan) < 2:
        return plan
    base_out = Path(plan[0][1].train.out_dir)
    previous = None
    for name, cfg in plan:
        cfg.train.out_dir = str(base_out / name)
        if previous is not None and not cfg.train.init_from:
            cfg.train.init_from = str(export_path(previous.train.out_dir))
        previous = cfg
    return plan


def already_done(plan: Plan, cfg: JobConfig, only_stage: int | None, resume: str) -> bool:
    """A run of the whole curriculum (no --stage) that may resume skips a stage whose export is
    there: an earlier invocation finished it."""
    return (len(plan) > 1 and only_stage is None and resume not in ("none", "fresh")
            and export_exists(export_path(cfg.train.out_dir)))


def exported_by(plan: Plan, stage: int, path: str) -> str | None:
    """The name of the stage before `stage` (1-based) whose export `path` is, if any: stage 2's
    init_from of a chained plan is stage 1's export."""
    return next((name for name, cfg in plan[:stage - 1] if str(export_path(cfg.train.out_dir)) == path), None)
