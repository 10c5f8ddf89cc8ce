"""`vgpt train`: run one stage, or the whole curriculum, with one Trainer.

    vgpt train --config configs/stages/stage2.yaml [--a.b=c ...]           one stage
    vgpt train --config configs/pretrain.yaml [--stage N] [--resume auto]  stages in order
    vgpt train ... --nproc 2                                               local multi-process (torchrun)

A curriculum file has `stages: [files or inline mappings]` plus sections shared
by every stage; each stage's sections override the shared ones, and command-line
overrides beat both. Stage N+1 starts from stage N's export
(`train.init_from`), and each stage writes under `<out_dir>/stageN`.
Configs are loaded and validated for every stage before any process group
starts, so a bad key in stage 4 fails in the first second, not after stage 3.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from orchestration.config import CONFIG_ROOT, ConfigError, JobConfig, from_dict, parse_overrides, read_yaml, resolve_raw


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
    if "stages" not in raw:
        return [(path.stem, from_dict(JobConfig, resolve_raw(raw, pairs)))]
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
            cfg = from_dict(JobConfig, resolve_raw(_merge(shared, stage_raw), pairs))
        except ConfigError as e:
            raise ConfigError(f"{e} (stage {i}: {stage_file})") from None
        plan.append((f"stage{i}", cfg))
    if only_stage is not None:
        if not 1 <= only_stage <= len(plan):
            raise ConfigError(f"--stage: got {only_stage}, expected 1..{len(plan)}")
    return plan


def check_token_limits(plan: list[tuple[str, JobConfig]]) -> None:
    """A stage whose samples cannot fit its token limit fails now, not at its first step.

    The smallest sequence F frames can make is one clip (no clean copies):
    F * (patches + 2) tokens. With the dataset's latent size known (index.json
    `latent_shape`), that must fit both data.stage.max_tokens and model.max_tokens.
    """
    from data.shard_format import ShardFormatError, get_fs, read_index
    from pretrain.layout import sequence_length

    for name, cfg in plan:
        if cfg.train.data != "latents":
            continue
        st = cfg.data.stage
        if st.max_tokens > cfg.model.max_tokens:
            raise ConfigError(f"{name}: data.stage.max_tokens={st.max_tokens} exceeds model.max_tokens="
                              f"{cfg.model.max_tokens}; the loader would hand the model sequences it refuses")
        try:
            index = read_index(*get_fs(cfg.data.root, cfg.data.storage_options))
        except (ShardFormatError, FileNotFoundError, OSError):
            continue  # no dataset yet: the loader reports it when the stage starts
        shape = index.get("latent_shape")
        if not shape:
            continue
        p = cfg.model.patch_size
        patches = (shape[1] // p) * (shape[2] // p)
        need = sequence_length([[st.frames]], patches)
        limit = min(st.max_tokens, cfg.model.max_tokens)
        if need > limit:
            raise ConfigError(f"{name}: data.stage.frames={st.frames} needs at least {need} tokens per sample at "
                              f"latent {shape[1]}x{shape[2]} ({patches} patches per frame), above the token "
                              f"limit {limit} (data.stage.max_tokens / model.max_tokens)")


def run_plan(plan: list[tuple[str, JobConfig]], only_stage: int | None, resume: str) -> list[Path]:
    from pretrain.trainer import Trainer

    chained = len(plan) > 1
    exports: list[Path] = []
    base_out = Path(plan[0][1].train.out_dir)
    for i, (name, cfg) in enumerate(plan, start=1):
        if chained:
            cfg.train.out_dir = str(base_out / name)
            if i > 1 and not cfg.train.init_from:
                cfg.train.init_from = str(base_out / f"stage{i - 1}" / "export" / "model.safetensors")
        if only_stage is not None and i != only_stage:
            continue
        export = Path(cfg.train.out_dir) / "export" / "model.safetensors"
        if chained and only_stage is None and export.is_file() and resume != "none":
            exports.append(export)  # finished in an earlier invocation
            continue
        exports.append(Trainer(cfg, stage_name=name).run(resume=resume))
    return exports


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--stage", type=int, default=None, help="run only this stage of a curriculum")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint) | none | a path")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (spawns torchrun)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="with --nproc: torchrun restarts all workers this often after a failure; "
                             "each restart resumes from the newest complete checkpoint")
    args, overrides = parser.parse_known_args(argv)
    try:
        plan = plan_stages(args.config, overrides, args.stage)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            from pretrain.trainer import check_layout_fits
            for _, cfg in plan:
                check_layout_fits(cfg, args.nproc)
            check_token_limits(plan)
            return _spawn_torchrun(args.nproc, args.max_restarts, argv)
        from pretrain.trainer import check_layout_fits
        for _, cfg in plan:
            check_layout_fits(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_token_limits(plan)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_plan(plan, args.stage, args.resume)
    return 0


def _spawn_torchrun(nproc: int, max_restarts: int, argv: list[str]) -> int:
    """Re-run this command under torchrun on loopback (c10d rendezvous, elastic restarts)."""
    from parallel.engine import _free_port

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
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", f"--max_restarts={max_restarts}",
           "-m", "orchestration.cli", "train", *rest]
    return subprocess.call(cmd)
