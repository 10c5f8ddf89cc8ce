"""Held-out loss of an export on a fixed synthetic evaluation set (fixed videos from a seed
training never uses, fixed clip cuts, fixed noise): what sweep trials are judged on.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from data.batch import Batch
from data.stage import clip_sizes, sample_rng
from data.synthetic.latents import moving_square_latents
from jobconfig.job import JobConfig
from pretrain.checkpoint.export import load_export
from pretrain.model.videogpt import build_model
from pretrain.training.objective import next_clip_loss, row_seed

# bumped whenever the set changes (2: clip cuts from the stage sampler, data/stage.py); in sweep trial keys
HELD_OUT_VERSION = 2


def synthetic_eval_seed(seed: int) -> int:
    """The video seed of the held-out set evaluated during synthetic training (eval.seed), apart from
    the training videos' (train.seed)."""
    return 1_000_003 + seed


def eval_batch(job: JobConfig, eval_cfg: dict) -> tuple[Batch, list[int]]:
    """The fixed held-out batch (one row per video, its own clip cuts) and its noise seeds."""
    syn = dataclasses.replace(job.synthetic, num_videos=eval_cfg["num_videos"])
    videos = moving_square_latents(syn, job.model.latent_channels, seed=eval_cfg["seed"])
    F = videos.shape[1]
    clips = [[list(clip_sizes(syn.clip_policy, F, sample_rng(eval_cfg["seed"], 0, i)))]
             for i in range(videos.shape[0])]
    seeds = [row_seed(eval_cfg["seed"], i, salt=1) for i in range(videos.shape[0])]
    return Batch(videos, clips), seeds


def held_out_loss(job: JobConfig, export: Path, eval_cfg: dict) -> float:
    model = build_model(job.model, device="cpu", seed=job.train.seed)
    load_export(model, export)
    model.eval()
    batch, seeds = eval_batch(job, eval_cfg)
    with torch.no_grad():
        return float(next_clip_loss(model, batch, job.objective, seeds))
