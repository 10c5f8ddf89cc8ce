"""The DeepSpeed engine, configured from our config tree (no hand-written JSON).

`deepspeed_config` turns the `parallel:` and `train:` sections into DeepSpeed's
dict: ZeRO stage 0-3 with optional CPU offload, bf16 or fp32, gradient
clipping, micro batch and accumulation. The optimiser is AdamW with the
METHOD.md defaults; the schedule is linear warmup then constant or cosine.
`init_process_group` starts torch.distributed for the chosen device, also for
a single process (DeepSpeed always wants a process group), on loopback.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from pretrain.config import TrainConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str) -> DistInfo:
    """Join the job's process group (torchrun env), or make a 1-rank group on loopback."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torchrun the rendezvous store outlives a failed attempt; give every attempt its own
            # key space, or the restarted ranks read the dead ranks' addresses and gloo cannot connect.
            from datetime import timedelta

            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timedelta(minutes=30))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"vgpt/attempt_{restart}/", base),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # a no-op when started above
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def deepspeed_config(pc: ParallelConfig, tc: TrainConfig, dp_size: int, micro_batch: int | None = None) -> dict:
    zero: dict = {"stage": pc.zero_stage}
    if pc.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if pc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if pc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    micro = micro_batch or tc.batch_size  # rows per rank per micro step (bookkeeping for DeepSpeed)
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "train_batch_size": micro * tc.grad_accum_steps * dp_size,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": pc.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if pc.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam; it is AdamW with the same hyper-parameters
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": tc.lr, "betas": list(tc.betas), "eps": tc.eps,
                                                         "weight_decay": tc.weight_decay}}
    return cfg


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


def build_engine(model: torch.nn.Module, pc: ParallelConfig, tc: TrainConfig, dp_size: int, mpu=None,
                 micro_batch: int | None = None):
    """deepspeed.initialize with our optimiser and schedule; returns the engine."""
    import deepspeed

    config = deepspeed_config(pc, tc, dp_size, micro_batch)
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                      weight_decay=tc.weight_decay)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, mpu=mpu,
                                           model_parameters=None if optimizer else model.parameters())
    return engine


def gather_full_state_dict(model: torch.nn.Module, zero3: bool, rank: int,
                           tp_group=None) -> dict[str, torch.Tensor] | None:
    """Full-size, plain-model weights on rank 0 (None elsewhere). Collective under ZeRO-3 and TP."""
    import contextlib

    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with ctx:
        if tp_group is not None:
            from parallel.tensor_parallel import gather_tensor_parallel_state_dict

            sd = gather_tensor_parallel_state_dict(model, tp_group=tp_group)
        else:
            sd = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    return {k: v.cpu() for k, v in sd.items()} if rank == 0 else None


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each backbone block in backward instead of storing its activations."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    model.backbone.checkpoint_fn = partial(checkpoint, use_reentrant=False)
