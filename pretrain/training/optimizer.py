"""The optimiser and LR schedule of every stage: AdamW with the configured hyper-parameters
(per stage: configs/stages/), linear warmup, then constant or cosine.

Warmup comes in two units, because the reference counts it in a unit that
depends on the world size:
  train.warmup_scheduler_steps  the reference's `--lr_warmup_steps` (320,000 in every
      stage): transformers' constant-with-warmup schedule, which accelerate's
      AcceleratedScheduler advances once per process per optimiser step. The
      scheduler therefore sits at n * world_size after n optimiser steps and the
      LR of (0-based) optimiser step n is lr * min(1, n * world_size / N): zero at
      step 0, full after N / world_size steps (40,000 on 8 devices). The
      reference multiplies its flag by the gradient-accumulation steps (1 in all
      its scripts); we do not, so N here is the scheduler-step count itself.
  train.warmup_steps  plain optimiser steps, for short runs (debug, quickstart,
      sweeps): lr * min(1, (n + 1) / N). It keeps the +1, so the first step
      already trains: a zero-LR step is a sizeable waste of a budget of tens of
      steps, and the results of those configs stay as they were.

The scheduler counts scheduler steps (`last_epoch`) the way accelerate does:
`per_step` of them per optimiser step (world_size for warmup_scheduler_steps,
1 otherwise), in its saved state. A run resumed on another world size carries
on from the scheduler steps already taken, as the reference's resumed
scheduler would, instead of jumping to n * new_world_size.

On CUDA, AdamW runs fused (one kernel for the whole update instead of a
foreach launch per op); elsewhere torch's default implementation. NPU keeps
the default: torch_npu ships its own fused optimisers, and torch's fused
AdamW is built for CUDA only.
"""
from __future__ import annotations

import math

import torch

from jobconfig.train import TrainConfig


def per_step(tc: TrainConfig, world_size: int) -> int:
    """Scheduler steps per optimiser step: the training processes (the whole world, SP and
    TP ranks included, as accelerate counts them) for warmup_scheduler_steps, else 1."""
    return world_size if tc.warmup_scheduler_steps else 1


def lr_lambda(tc: TrainConfig, world_size: int):
    """Multiplier of the base LR after s scheduler steps (s = optimiser steps unless the
    warmup is counted in the reference's scheduler steps): linear warmup, then constant or cosine."""
    k = per_step(tc, world_size)
    if tc.warmup_scheduler_steps:
        warmup, offset = tc.warmup_scheduler_steps, 0  # the reference: s / N, from 0
    else:
        warmup, offset = tc.warmup_steps, 1  # ours: (s + 1) / N
    total = tc.steps * k  # the end of the cosine, in scheduler steps

    def f(s: int) -> float:
        if warmup and s + offset < warmup:
            return (s + offset) / warmup
        if tc.schedule == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (s - warmup) / max(1, total - warmup)))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class ScheduleLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over scheduler steps, advanced `per_step` of them per optimiser step.

    Stepping by `per_step` at once equals accelerate's `per_step` single steps
    for our lambda (it reads only the step count). The saved state holds the
    scheduler steps taken (`last_epoch`); `per_step` is this run's, never the
    checkpoint's, so a resume on another world size advances at its own rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn, per_step: int):
        self.per_step = per_step
        super().__init__(optimizer, fn)

    def step(self, epoch=None) -> None:
        if self._step_count > 0 and epoch is None:  # not the constructor's initial step
            self.last_epoch += self.per_step - 1  # LambdaLR.step adds the last one
        super().step(epoch)

    def load_state_dict(self, state_dict: dict) -> None:
        ours = self.per_step
        super().load_state_dict(state_dict)
        self.per_step = ours


def adamw_kwargs(device_type: str) -> dict:
    """The implementation choice of AdamW for parameters on `device_type` (cuda, npu, cpu)."""
    return {"fused": True} if device_type == "cuda" else {}


def build_optimizer(params, tc: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with the configured hyper-parameters (stage 1: betas 0.9/0.999, eps 1e-8;
    stages 2-4: 0.9/0.95, 1e-5; wd 0.1 everywhere: configs/stages/), fused on CUDA. `device_type`:
    where the parameters live (cuda, npu, cpu), as the caller that put them there knows."""
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay,
                             **adamw_kwargs(device_type))


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, world_size: int) -> ScheduleLR:
    """The LR schedule of `tc` for a run of `world_size` training processes (all ranks)."""
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size}, expected a positive integer")
    return ScheduleLR(optimizer, lr_lambda(tc, world_size), per_step(tc, world_size))
