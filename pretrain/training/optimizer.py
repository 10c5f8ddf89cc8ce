"""The optimiser and LR schedule of every stage: AdamW with the METHOD.md defaults, linear
warmup, then constant or cosine.
"""
from __future__ import annotations

import math

import torch

from jobconfig.train import TrainConfig


def lr_lambda(tc: TrainConfig):
    """Multiplier of the base LR at optimizer step s: linear warmup, then constant or cosine."""
    def f(step: int) -> float:
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(params, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the configured hyper-parameters (METHOD.md: betas 0.9/0.95, eps 1e-5, wd 0.1)."""
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
