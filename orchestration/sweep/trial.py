"""One sweep trial: plan it (a JobConfig and its key), train it, measure it.

`plan(cfg)` expands the sweep grid into trials, each a full JobConfig (the
base job config + the sweep's job overrides + the trial's size, lr, batch and
steps = budget // batch, or with `grid.compute_levels` the steps that reach
each level: orchestration/sweep/plan.py), keyed by sha256 of the canonical JSON of that config
and the evaluation set (first 16 hex): the same trial always has the same key,
so a re-run can skip what is finished. Planning builds every config, so a bad
grid fails here, before any trial starts.

`run_trial(spec, trial_dir)` runs in a fresh process (a Ray task with
max_calls=1: the Trainer initialises torch.distributed, so never two Trainers
in one process): the real Trainer on the DeepSpeed engine, then the held-out
loss of the exported model on a fixed evaluation set (moving-square videos
from a seed training never uses, fixed clip cuts and noise seeds, one
`next_clip_loss` under no_grad). The curve is the per-step *train* loss from
metrics.jsonl (no extra held-out evaluations mid-run), with cumulative tokens
and training FLOPs as the trainer's MFU counts them (pretrain/training/metrics.py
`train_flops`): 6N per token plus attention over the (query, key) pairs the
mask allows, from each line's `attention_pairs`. Fits on this C are fits on
useful FLOPs; `flops_6nd` is the attention-free 6ND for comparison.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import from_dict, load_config
from orchestration.sweep.config import SweepConfig
from orchestration.sweep.plan import check_levels, count_params, planned_tokens, steps_for_level
from parallel.device import destroy_process_group
from pretrain.evaluation.heldout import HELD_OUT_VERSION, held_out_loss
from pretrain.training.metric_sinks import METRICS_FILE
from pretrain.training.metrics import train_flops
from pretrain.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# what a result's `flops` counts; in trial keys, so a new count re-runs old trials instead of mixing
# them (2: attention over the pairs the mask allows, train_flops; 1: a dense L x L square)
FLOPS_VERSION = 2


def resolve_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def trial_key(job: dict, eval_cfg: dict) -> str:
    job = json.loads(json.dumps(job))
    job["train"]["out_dir"] = ""  # the trial dir is named by the key, not part of it
    # the held-out set's construction is part of what a result means: a new one re-runs old trials
    canon = json.dumps({"job": job, "eval": eval_cfg, "heldout": HELD_OUT_VERSION, "flops": FLOPS_VERSION},
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _job(cfg: SweepConfig, size, lr: float, bs: int, steps: int) -> JobConfig:
    over = [*cfg.job_overrides, f"--model.preset={size.preset}",
            *(f"--model.{k}={v}" for k, v in size.model.items()),
            f"--train.lr={lr}", f"--train.batch_size={bs}", f"--train.steps={steps}",
            "--train.grad_accum_steps=1", "--train.tensorboard=false", "--train.checkpoint_every=0"]
    job = load_config(resolve_path(cfg.base), over)
    if job.train.data != "synthetic":
        raise ConfigError("sweep: the held-out set is synthetic; set train.data=synthetic "
                          f"in {cfg.base} or job_overrides")
    return job


def plan(cfg: SweepConfig) -> list[dict]:
    """Every trial of the grid as {key, size, budget, level, lr, batch_size, job (dict), ...}; strict.
    A budgets grid trains budget // batch steps; a compute_levels grid the steps whose FLOPs reach
    the level (orchestration/sweep/plan.py), with N and the planned FLOPs and tokens recorded."""
    g = cfg.grid
    trials, dropped = [], []
    ev = dataclasses.asdict(cfg.eval)
    for size in g.sizes:
        for lr in g.lrs:
            for bs in g.batch_sizes:
                if g.budgets:
                    for budget in g.budgets:
                        d = dataclasses.asdict(_job(cfg, size, lr, bs, budget // bs))
                        trials.append({"key": trial_key(d, ev), "size": size.name, "budget": budget, "level": None,
                                       "lr": lr, "batch_size": bs, "job": d, "eval": ev})
                    continue
                probe = _job(cfg, size, lr, bs, 1)
                n = count_params(probe.model)
                for level in g.compute_levels:
                    steps, flops, one = steps_for_level(probe, n, level)
                    if steps < g.min_steps:
                        dropped.append(f"{size.name} at {level:.4g} (batch {bs}): {steps} step(s) < min_steps "
                                       f"{g.min_steps}")
                        continue
                    d = dataclasses.asdict(_job(cfg, size, lr, bs, steps))
                    trials.append({"key": trial_key(d, ev), "size": size.name, "budget": steps * bs, "level": level,
                                   "lr": lr, "batch_size": bs, "job": d, "eval": ev, "N": n, "planned_flops": flops,
                                   "step_flops": one, "planned_tokens": planned_tokens(probe, steps)})
    if g.compute_levels:
        check_levels(trials, dropped)
    keys = [t["key"] for t in trials]
    if len(set(keys)) != len(keys):
        raise ConfigError("grid: two trials resolve to the same config (duplicate sizes or budgets, or compute "
                          "levels so close that a size gets the same steps at two of them?)")
    return trials


def run_trial(spec: dict, trial_dir: str) -> dict:
    """Train one trial from scratch in `trial_dir` and return its result record."""

    torch.set_num_threads(1)  # one CPU per trial, and the same reduction order every run
    t0 = time.time()
    out = Path(trial_dir)
    shutil.rmtree(out, ignore_errors=True)  # a retried or interrupted trial starts clean
    job = from_dict(JobConfig, spec["job"])
    job.train.out_dir = str(out)
    try:
        with Trainer(job, f"trial-{spec['key']}") as trainer:
            export = trainer.run(resume="none")
    finally:
        destroy_process_group()
    eval_loss = held_out_loss(job, export, spec["eval"])
    n_params = count_params(job.model)
    curve, tokens, flops = [], 0.0, 0.0
    for line in (out / METRICS_FILE).read_text().splitlines():
        m = json.loads(line)
        tokens += m["tokens"]
        flops += train_flops(job.model, n_params, m["tokens"], m["attention_pairs"])
        curve.append({"step": m["step"], "loss": m["loss"], "tokens": tokens, "flops": flops})
    return {"key": spec["key"], "size": spec["size"], "budget": spec["budget"], "level": spec.get("level"),
            "lr": spec["lr"],
            "batch_size": spec["batch_size"], "steps": job.train.steps, "N": n_params, "D": tokens,
            "flops": flops, "flops_6nd": 6.0 * n_params * tokens, "eval_loss": eval_loss,
            "final_train_loss": curve[-1]["loss"], "curve": curve, "seconds": round(time.time() - t0, 2)}
