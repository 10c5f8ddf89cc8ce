"""IsoFLOP grids: the step budget of each (compute level, size, batch) trial, and `vgpt sweep plan`.

A `grid.compute_levels` sweep asks, for every compute level C and size N, for
the number of steps whose training FLOPs equal C, counted exactly as the
runner counts them (pretrain/training/metrics.py `train_flops`: 6N per token
plus attention over the pairs the mask allows). Trials on synthetic rows,
a pure function of (train.seed, global row index) (data/sources.py
SyntheticSource): the planner replays the rows' clip cuts without building
any latents and sums the same FLOPs step by step: the step count it picks is
the one whose cumulative FLOPs lie closest to C, so a trial lies on its level
within half a step. Past REPLAY_ROWS rows (cluster-sized runs) the mean
per-row cost of the replayed rows extrapolates the rest. Trials on a latent
dataset: every step trains batch_size rows of the cost `row_cost` gives
(orchestration/sweep/dataset.py: exact for one latent shape and fixed clips,
else the mean), so the same rule picks the steps.

A (level, size) pair that would train fewer than `grid.min_steps` steps is
dropped (the size is too big for that level); a level left with fewer than
three sizes is a ConfigError: an IsoFLOP parabola needs three points.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from data.batch import patches_per_frame, sequence_length
from data.stage import clip_sizes, sample_rng, uniform_int
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from pretrain.model.videogpt import VideoGPT
from pretrain.training.metrics import allowed_attention_pairs, train_flops

REPLAY_ROWS = 50_000
MIN_SIZES_PER_LEVEL = 3


def count_params(model_cfg) -> int:
    """Parameters of the model a trial builds (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in VideoGPT(model_cfg).parameters())


_ROWS: dict[tuple, tuple[list[float], list[float]]] = {}


def _row_costs(seed: int, num_videos: int, frames: int, policy: str, patches: int, rows: int):
    """(tokens, attention pairs) of global rows 0..rows-1 of the synthetic source (cached, grown on demand)."""
    tok, pairs = _ROWS.setdefault((seed, num_videos, frames, policy, patches), ([], []))
    for g in range(len(tok), rows):
        rng = sample_rng(seed, 0, g)
        uniform_int(rng, 0, num_videos - 1)  # the video pick, drawn before the clips
        row = [list(clip_sizes(policy, frames, rng))]
        tok.append(sequence_length(row, patches))
        pairs.append(allowed_attention_pairs(row, patches))
    return np.asarray(tok[:rows], float), np.asarray(pairs[:rows], float)


def step_flops(job: JobConfig, n_params: int, steps: int, row: tuple[float, float] | None = None) -> np.ndarray:
    """Cumulative training FLOPs after 1..steps steps of `job` (one process, grad_accum_steps rows
    of batch_size each per step), as trial.run_trial sums them from metrics.jsonl. `row`: on a latent
    dataset, the (tokens, attention pairs) of one row (orchestration/sweep/dataset.py `row_cost`)."""
    syn, m = job.synthetic, job.model
    rows_per_step = job.train.batch_size * job.train.grad_accum_steps
    if row is not None:
        return np.cumsum(np.full(steps, rows_per_step * float(train_flops(m, n_params, row[0], row[1]))))
    patches = patches_per_frame((syn.latent_height, syn.latent_width), m.patch_size)
    want = steps * rows_per_step
    replay = min(want, max(REPLAY_ROWS // rows_per_step, 1) * rows_per_step)
    tok, pairs = _row_costs(job.train.seed, syn.num_videos, syn.frames, syn.clip_policy, patches, replay)
    per_row = train_flops(m, n_params, tok, pairs)
    per_step = per_row.reshape(-1, rows_per_step).sum(axis=1)
    if want > replay:  # extrapolate with the mean step of the replayed rows
        per_step = np.concatenate([per_step, np.full(steps - len(per_step), per_step.mean())])
    return np.cumsum(per_step)


def steps_for_level(job: JobConfig, n_params: int, level: float,
                    row: tuple[float, float] | None = None) -> tuple[int, float, float]:
    """(steps, their cumulative FLOPs, FLOPs of one step at the level) closest to `level`."""
    probe = step_flops(job, n_params, 16, row)
    guess = max(1, int(level / (probe[-1] / len(probe))))
    cum = step_flops(job, n_params, int(guess * 1.5) + 16, row)
    i = int(np.argmin(np.abs(cum - level)))
    steps = np.diff(np.concatenate([[0.0], cum]))
    one = float(steps[i:i + 2].max())  # the larger of the last step and the next: the level lies within half of it
    return i + 1, float(cum[i]), one


def report_plan(trials: list[dict], file=None) -> None:
    """`vgpt sweep plan`: the trials per compute level, their steps and FLOPs, and sizes per level."""
    file = file or sys.stdout
    levels = sorted({t["level"] for t in trials if t.get("level")})
    if not levels:
        print(f"{len(trials)} trials on a budgets grid (no compute_levels): sizes x budgets x lrs x batches",
              file=file)
        for t in trials:
            print(f"  {t['key']}  {t['size']:>8}  budget {t['budget']} samples  lr {t['lr']:.3g}  "
                  f"batch {t['batch_size']}  steps {t['job']['train']['steps']}", file=file)
        return
    print(f"{len(trials)} trials on {len(levels)} compute levels (FLOPs as the runner counts them: 6ND + attention)",
          file=file)
    for c in levels:
        here = [t for t in trials if t.get("level") == c]
        sizes = sorted({t["size"] for t in here}, key=lambda s: next(t["N"] for t in here if t["size"] == s))
        print(f"C = {c:.4g}: {len(sizes)} sizes ({', '.join(sizes)})", file=file)
        for t in sorted(here, key=lambda t: (t["N"], t["batch_size"], t["lr"])):
            off = (t["planned_flops"] - c) / t["step_flops"]
            print(f"  {t['key']}  {t['size']:>8}  N {t['N']:.3g}  lr {t['lr']:.3g}  batch {t['batch_size']:>4}  "
                  f"steps {t['job']['train']['steps']:>6}  D {t['planned_tokens']:.3g}  FLOPs {t['planned_flops']:.4g} "
                  f"({off:+.2f} step)", file=file)


def check_levels(trials: list[dict], dropped: list[str]) -> None:
    """Every compute level needs at least three sizes (one IsoFLOP parabola)."""
    for c in sorted({t["level"] for t in trials}):
        sizes = {t["size"] for t in trials if t["level"] == c}
        if len(sizes) < MIN_SIZES_PER_LEVEL:
            why = f" (dropped: {'; '.join(d for d in dropped if f'{c:.4g}' in d)})" if dropped else ""
            raise ConfigError(f"grid.compute_levels: level {c:.4g} FLOPs gets {len(sizes)} size(s) "
                              f"{sorted(sizes)}, an IsoFLOP line needs at least {MIN_SIZES_PER_LEVEL}{why}")


def planned_tokens(job: JobConfig, steps: int, row: tuple[float, float] | None = None) -> float:
    syn = job.synthetic
    rows = steps * job.train.batch_size * job.train.grad_accum_steps
    if row is not None:
        return rows * row[0]
    patches = patches_per_frame((syn.latent_height, syn.latent_width), job.model.patch_size)
    replay = min(rows, REPLAY_ROWS)
    tok, _ = _row_costs(job.train.seed, syn.num_videos, syn.frames, syn.clip_policy, patches, replay)
    return float(tok.sum() + (rows - replay) * tok.mean())
