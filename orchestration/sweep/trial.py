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
in one process), or in each process of one torchrun on the task's node for a
size of several GPUs (`grid.sizes[].gpus`, `launch_trial`: data parallel, the
batch split over the ranks, the steps and FLOPs of the one-process plan): the
real Trainer on the DeepSpeed engine. On a dataset
(the sweep's `dataset`: orchestration/sweep/dataset.py) it trains on the
dataset's samples less its held-out split and is judged by the training
evaluator (pretrain/evaluation/latent_eval.py) on that split, after its last
step, inside the Trainer: on the trial's device and ranks, with fixed noise
levels, clip partitions and noise; `eval_loss` is that step's `heldout_loss`.
The keys it trained on are written to the trial dir, and a trial that served
a held-out key fails. On synthetic data the exported model is judged on a
fixed evaluation set (moving-square videos from a seed training never uses,
fixed clip cuts and noise seeds, one `next_clip_loss` under no_grad, on the
CPU). The curve is the per-step *train* loss from
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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import from_dict, load_config
from orchestration.sweep import dataset as sweep_data
from orchestration.sweep.config import SweepConfig
from orchestration.sweep.plan import check_levels, count_params, planned_tokens, steps_for_level
from parallel.device import destroy_process_group, free_port
from pretrain.evaluation.heldout import HELD_OUT_VERSION, held_out_loss
from pretrain.evaluation.latent_eval import make_evaluator
from pretrain.training.metric_sinks import METRICS_FILE
from pretrain.training.metrics import train_flops
from pretrain.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
# what a result's `flops` counts; in trial keys, so a new count re-runs old trials instead of mixing
# them (2: attention over the pairs the mask allows, train_flops; 1: a dense L x L square)
FLOPS_VERSION = 2


def resolve_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def trial_key(job: dict, eval_cfg: dict, data: dict | None = None) -> str:
    job = json.loads(json.dumps(job))
    job["train"]["out_dir"] = ""  # the trial dir is named by the key, not part of it
    # the held-out set's construction is part of what a result means: a new one re-runs old trials;
    # so is the dataset's version (`data`, orchestration/sweep/dataset.py): a grown dataset too
    what = {"job": job, "eval": eval_cfg, "heldout": HELD_OUT_VERSION, "flops": FLOPS_VERSION}
    if data is not None:
        what["data"] = data
    canon = json.dumps(what, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def nproc(size) -> int:
    """Processes of a trial of this size: one per GPU with `gpus` > 1 (one torchrun), else one."""
    return size.gpus if size.gpus > 1 else 1


def _job(cfg: SweepConfig, size, lr: float, bs: int, steps: int, ranks: int = 1) -> JobConfig:
    """The trial's job config; `ranks` processes share the batch of `bs` samples per step (the planner
    counts a step's FLOPs with ranks=1: the same rows in one process)."""
    if bs % ranks:
        raise ConfigError(f"batch_sizes: {bs} samples per step do not split over the {ranks} GPUs of size "
                          f"{size.name} (grid.sizes[].gpus)")
    bs //= ranks
    over = [*cfg.job_overrides, f"--model.preset={size.preset}",
            *(f"--model.{k}={v}" for k, v in size.model.items()),
            f"--train.lr={lr}", f"--train.batch_size={bs}", f"--train.steps={steps}",
            "--train.grad_accum_steps=1", "--train.tensorboard=false", "--train.checkpoint_every=0"]
    if cfg.dataset:  # its samples less the held-out split, judged on the split after the last step
        ev = cfg.eval
        over += ["--train.data=latents", f"--data.root={cfg.dataset}", "--data.sources=[]", f"--data.batch_size={bs}",
                 "--data.epochs=0", "--eval.root=null", f"--eval.heldout_fraction={ev.heldout_fraction}",
                 f"--eval.heldout_max={ev.num_videos}", f"--eval.seed={ev.seed}", f"--eval.every={steps}",
                 "--eval.predict_every=0"]
    job = load_config(resolve_path(cfg.base), over)
    if not cfg.dataset and job.train.data != "synthetic":
        raise ConfigError(f"dataset: empty, but {cfg.base} trains on train.data={job.train.data}; set dataset to "
                          "the precomputed latent root the trials train on (or train.data=synthetic)")
    return job


def _gpus(cfg: SweepConfig, size) -> dict:
    """A trial's GPU request and processes, when its size asks for several GPUs (else the sweep's)."""
    return {"gpus": size.gpus, "nproc": nproc(size)} if size.gpus else {}


def plan(cfg: SweepConfig) -> list[dict]:
    """Every trial of the grid as {key, size, budget, level, lr, batch_size, job (dict), ...}; strict.
    A budgets grid trains budget // batch steps; a compute_levels grid the steps whose FLOPs reach
    the level (orchestration/sweep/plan.py), with N and the planned FLOPs and tokens recorded."""
    g = cfg.grid
    trials, dropped = [], []
    ev = dataclasses.asdict(cfg.eval)
    data, row = None, None
    if cfg.dataset:  # read once, before any trial: a dataset the stage cannot train on fails here
        probe = _job(cfg, g.sizes[0], g.lrs[0], g.batch_sizes[0], 1)
        meta, data = sweep_data.check(cfg.dataset, probe)
        row = sweep_data.row_cost(meta, probe)
    for size in g.sizes:
        for lr in g.lrs:
            for bs in g.batch_sizes:
                if g.budgets:
                    for budget in g.budgets:
                        d = dataclasses.asdict(_job(cfg, size, lr, bs, budget // bs, nproc(size)))
                        trials.append({"key": trial_key(d, ev, data), "size": size.name, "budget": budget, "level": None,
                                       "lr": lr, "batch_size": bs, "job": d, "eval": ev, **_gpus(cfg, size)})
                    continue
                probe = _job(cfg, size, lr, bs, 1)
                n = count_params(probe.model)
                for level in g.compute_levels:
                    steps, flops, one = steps_for_level(probe, n, level, row)
                    if steps < g.min_steps:
                        dropped.append(f"{size.name} at {level:.4g} (batch {bs}): {steps} step(s) < min_steps "
                                       f"{g.min_steps}")
                        continue
                    d = dataclasses.asdict(_job(cfg, size, lr, bs, steps, nproc(size)))
                    trials.append({"key": trial_key(d, ev, data), "size": size.name, "budget": steps * bs, "level": level,
                                   "lr": lr, "batch_size": bs, "job": d, "eval": ev, "N": n, "planned_flops": flops,
                                   "step_flops": one, "planned_tokens": planned_tokens(probe, steps, row),
                                   **_gpus(cfg, size)})
    if g.compute_levels:
        check_levels(trials, dropped)
    keys = [t["key"] for t in trials]
    if len(set(keys)) != len(keys):
        raise ConfigError("grid: two trials resolve to the same config (duplicate sizes or budgets, or compute "
                          "levels so close that a size gets the same steps at two of them?)")
    return trials


def launch_trial(spec: dict, trial_dir: str) -> dict:
    """What a sweep's Ray task runs: the trial in this process, or, for a size of several GPUs
    (`nproc` > 1), under one torchrun on this node (orchestration/launch/local_torchrun.py: its store on
    loopback), each rank a `run_trial`, rank 0 writing the result this returns."""
    n = spec.get("nproc", 1)
    if n <= 1:
        return run_trial(spec, trial_dir)
    out = Path(trial_dir)
    shutil.rmtree(out, ignore_errors=True)  # a retried or interrupted trial starts clean (before any rank)
    with tempfile.TemporaryDirectory(prefix="vgpt-trial-") as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "orchestration.launch.local_torchrun", "--local-addr=127.0.0.1",
               f"--nproc_per_node={n}", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "orchestration.sweep.trial", f"{tmp}/spec.json", str(out), f"{tmp}/result.json"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if p.returncode:
            raise RuntimeError(f"trial {spec['key']}: torchrun of {n} processes exited {p.returncode}: "
                               f"{(p.stdout + p.stderr)[-3000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def run_trial(spec: dict, trial_dir: str) -> dict:
    """Train one trial from scratch in `trial_dir` and return its result record (on every rank but the
    first of a multi-GPU trial: {})."""

    torch.set_num_threads(1)  # one CPU per trial, and the same reduction order every run
    t0 = time.time()
    out = Path(trial_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun, launch_trial cleaned it
        shutil.rmtree(out, ignore_errors=True)  # a retried or interrupted trial starts clean
    job = from_dict(JobConfig, spec["job"])
    job.train.out_dir = str(out)
    latent = job.train.data == "latents"
    sources: list = []
    try:
        with Trainer(job, f"trial-{spec['key']}", data_factory=sweep_data.recording_source(sources),
                     evaluator_factory=make_evaluator if latent else None) as trainer:
            export = trainer.run(resume="none")
            rank = trainer.dist.rank
            if latent:  # every rank's keys written (and checked) before rank 0 counts them
                sweep_data.write_trained_keys(job, sources[0].served, out, rank)
                if trainer.dist.world_size > 1:
                    dist.barrier()
    finally:
        destroy_process_group()
    if rank:
        return {}  # a trial's other ranks: rank 0 reads the run's metrics and reports
    trained = sum(sweep_data.trained_keys(out).values()) if latent else None
    n_params = count_params(job.model)
    curve, tokens, flops, heldout = [], 0.0, 0.0, {}
    for line in (out / METRICS_FILE).read_text().splitlines():
        m = json.loads(line)
        tokens += m["tokens"]
        flops += train_flops(job.model, n_params, m["tokens"], m["attention_pairs"])
        curve.append({"step": m["step"], "loss": m["loss"], "tokens": tokens, "flops": flops})
        heldout = {k: v for k, v in m.items() if k.startswith("heldout_loss")} or heldout
    extra = {}
    if latent:
        if curve[-1]["step"] != job.train.steps or "heldout_loss" not in heldout:
            raise RuntimeError(f"trial {spec['key']}: no held-out evaluation after step {job.train.steps} in "
                               f"{out / METRICS_FILE}")
        eval_loss = heldout["heldout_loss"]
        extra = {"heldout": heldout, "trained_samples": trained}
    else:
        eval_loss = held_out_loss(job, export, spec["eval"])
    return {"key": spec["key"], "size": spec["size"], "budget": spec["budget"], "level": spec.get("level"),
            "lr": spec["lr"],
            "batch_size": spec["batch_size"], "steps": job.train.steps, "N": n_params, "D": tokens,
            "flops": flops, "flops_6nd": 6.0 * n_params * tokens, "eval_loss": eval_loss,
            "final_train_loss": curve[-1]["loss"], "curve": curve, "seconds": round(time.time() - t0, 2), **extra}


if __name__ == "__main__":  # one rank of a multi-GPU trial: SPEC_JSON TRIAL_DIR RESULT_JSON (launch_trial)
    result = run_trial(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
    if result:
        Path(sys.argv[3]).write_text(json.dumps(result))
