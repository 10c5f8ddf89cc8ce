"""`vgpt train`: run one stage, or the whole curriculum, with one Trainer.

    vgpt train --config configs/stages/stage2.yaml [--a.b=c ...]           one stage
    vgpt train --config configs/pretrain.yaml [--stage N] [--resume auto]  stages in order
    vgpt train ... --nproc 2                                               local multi-process (torchrun)

A curriculum file (jobconfig/curriculum.py) has `stages: [files or inline
mappings]` plus sections shared by every stage. Stage N+1 starts from stage
N's export (`train.init_from`), and each stage writes under `<out_dir>/stageN`
(orchestration/stages.py).
Every stage's config, parallel layout and token limits, its dataset (root,
index.json, a video long enough for the stage), out_dir, init_from, --resume
and s3 credentials (orchestration/preflight.py) are checked before any process
group starts, so a bad key in stage 4 fails in the first second; so is each
stage's memory plan on the device it will run on (orchestration/planning.py: a
layout planned not to fit is refused with its shortfall and smallest fix;
`--plan.ignore=true` starts it anyway).
`train.data: synthetic` trains on moving-square latents instead of a dataset
(configs/debug.yaml); `vgpt train-debug` is the deprecated name of that.
"""
from __future__ import annotations

import os
from pathlib import Path

from jobconfig.curriculum import plan_stages
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from orchestration import preflight
from orchestration.cli import CONFIG_HELP, reports_bad_input, verb_parser
from orchestration.faults import trainer_hooks
from orchestration.launch.local_torchrun import run_agent
from orchestration.stages import already_done, chain_stages
from parallel.device import destroy_process_group, free_port
from pretrain.checkpoint.export import export_path
from pretrain.evaluation.latent_eval import make_evaluator
from pretrain.inference.heldout_predict import make_predictor
from pretrain.training.resume_plan import RESUME_MODES
from pretrain.training.trainer import Trainer, check_layout_fits


def run_plan(plan: list[tuple[str, JobConfig]], only_stage: int | None, resume: str) -> list[Path]:
    """Run a chained plan (orchestration/stages.py), or its stage `only_stage`; the exports written or found."""
    exports: list[Path] = []
    for i, (name, cfg) in enumerate(plan, start=1):
        if only_stage is not None and i != only_stage:
            continue
        if already_done(plan, cfg, only_stage, resume):
            exports.append(export_path(cfg.train.out_dir))
            continue
        with Trainer(cfg, stage_name=name, hooks=trainer_hooks(), evaluator_factory=make_evaluator,
                     predictor_factory=make_predictor) as trainer:
            exports.append(trainer.run(resume=resume))
    return exports


@reports_bad_input("train")
def main(argv: list[str]) -> int:
    parser = verb_parser("train", __doc__, JobConfig)
    parser.add_argument("--config", required=True, help=CONFIG_HELP)
    parser.add_argument("--stage", type=int, default=None, help="run only this stage of a curriculum")
    parser.add_argument("--resume", default="auto", help=RESUME_MODES.replace("%", "%%"))
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (spawns torchrun)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="with --nproc: torchrun restarts all workers this often after a failure; "
                             "each restart resumes from the newest complete checkpoint")
    args, overrides = parser.parse_known_args(argv)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: got {args.nproc}, expected >= 1")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts: got {args.max_restarts}, expected >= 0")
    plan = chain_stages(plan_stages(args.config, overrides, args.stage))
    spawn = args.nproc > 1 and "WORLD_SIZE" not in os.environ
    world = args.nproc if spawn else int(os.environ.get("WORLD_SIZE", "1"))
    for _, cfg in plan:  # every stage's layout and token limits, before any process group starts
        check_layout_fits(cfg, world)
    # data, paths, credentials, init_from and --resume, before any process group, model or DeepSpeed
    latent_sizes = preflight.check_train(plan, args.stage, args.resume)
    # every stage's memory plan on its device (CPU runs: none), for its dataset's heaviest latent shape
    preflight.check_memory(plan, world, args.stage, latent_sizes)
    if spawn:
        return _spawn_torchrun(args.nproc, args.max_restarts, argv)
    try:
        run_plan(plan, args.stage, args.resume)
    finally:
        destroy_process_group()
    return 0


def _spawn_torchrun(nproc: int, max_restarts: int, argv: list[str]) -> int:
    """Re-run this command under torchrun on loopback (c10d rendezvous, elastic restarts), its agent in
    this process."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        rest.append(a)
    return run_agent(["--local-addr=127.0.0.1", f"--nproc_per_node={nproc}", "--nnodes=1",
                      "--master_addr=127.0.0.1", f"--master_port={free_port()}", f"--max_restarts={max_restarts}",
                      "-m", "orchestration.cli", "train", *rest])
