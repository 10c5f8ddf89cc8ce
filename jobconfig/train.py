"""`objective:` and `train:` sections: the next-clip diffusion objective and the training loop
(optimiser, schedule, budget, checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from jobconfig.errors import ConfigError


@dataclass
class ObjectiveConfig:
    """Rectified flow, x1 prediction (METHOD.md, Objective)."""
    context_noise_min: float = 0.9  # t_ctx ~ U(context_noise_min, 1): the reference's input_noise

    def validate(self) -> None:
        if not 0.0 <= self.context_noise_min <= 1.0:
            raise ConfigError(f"context_noise_min: got {self.context_noise_min}, expected a value in [0, 1]")


@dataclass
class TrainConfig:
    """The training loop: optimiser (METHOD.md defaults), schedule, budget, checkpoints.

    betas/eps default to stages 2-4 of the reference; its stage 1 builds AdamW with
    torch's defaults (0.9, 0.999) and 1e-8, which configs/stages/stage1.yaml sets.
    """
    steps: int = 200
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear warmup over this many optimiser steps (short runs)
    # linear warmup counted as the reference counts it (its --lr_warmup_steps, 320000): scheduler steps,
    # world_size of them per optimiser step; LR(n) = lr * min(1, n * world_size / N). At most one of the two.
    warmup_scheduler_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    batch_size: int = 1  # rows per rank per micro step of the synthetic source (the loader: data.batch_size)
    grad_accum_steps: int = 1
    seed: int = 0
    data: Literal["latents", "synthetic"] = "latents"  # the streaming loader (`data:`) or moving squares
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 3  # checkpoints kept besides every `keep_every`-th
    keep_every: int = 0
    # save in the background: training waits only for the copy of the state into host memory, then a
    # thread writes, checksums and commits it (at most one save in flight). None: on with a GPU/NPU
    async_checkpoint: Optional[bool] = None
    # a flushed window (train.log_every steps) whose loader skipped more than this fraction of its samples
    # stops the run with the reasons: a stage the data cannot feed trains on nothing otherwise
    max_skipped_fraction: float = 0.5
    init_from: Optional[str] = None  # a consolidated export (safetensors) to start from
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    out_dir: str = "runs/debug"
    tensorboard: bool = True
    # Weights & Biases project to log the step scalars to (None: off); mode and credentials come from the
    # environment (WANDB_MODE=offline, WANDB_API_KEY), never from the config
    wandb: Optional[str] = None
    # torch.compile each backbone block (attention left eager; pretrain/training/parallelize.py)
    compile: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"lr: got {self.lr}, expected a positive number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: got {list(self.betas)}, expected two numbers in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"eps: got {self.eps}, expected a positive number")
        for name in ("warmup_steps", "warmup_scheduler_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 0 (0 = no warmup)")
        if self.warmup_steps and self.warmup_scheduler_steps:
            # two units for one warmup: which one is meant cannot be guessed
            raise ConfigError(f"warmup_steps: got {self.warmup_steps} with warmup_scheduler_steps="
                              f"{self.warmup_scheduler_steps}, expected only one of warmup_steps (optimiser "
                              "steps) and warmup_scheduler_steps (the reference's scheduler steps, world_size "
                              "per optimiser step) to be set; set the other to 0")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"max_skipped_fraction: got {self.max_skipped_fraction}, expected a value in [0, 1]")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: got {self.checkpoint_every}, expected >= 0")
