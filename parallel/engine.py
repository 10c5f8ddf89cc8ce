"""The DeepSpeed engine, configured from our config tree (no hand-written JSON).

`deepspeed_config` turns the `parallel:` and `train:` sections into DeepSpeed's
dict: ZeRO stage 0-3 with optional CPU offload, bf16 or fp32, gradient
clipping, micro batch and accumulation, then deep-merges `parallel.deepspeed`
over it (the user's keys win; jobconfig/parallel.py refuses the keys derived
here). `build_engine` wraps a plain model with the caller's optimiser and
schedule (pretrain/training/optimizer.py); `gather_full_state_dict` collects
the full weights back for an export.

Defaults chosen for the device:
  overlap_comm  on for CUDA and NPU (NCCL/HCCL run the gradient reduce-scatter on
      their own stream, overlapping the backward), off on CPU: gloo runs
      collectives synchronously, so there is nothing to overlap and only the
      extra buffers remain.
  bf16.check_grad_overflow  off: bf16 has fp32's exponent range and no loss
      scale, so the per-step overflow check (an all-reduce and a device-to-host
      read every step) finds nothing to skip; the reference (accelerate, bf16)
      never skips a step either. A NaN shows in the logged loss.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Callable

import torch
from packaging.requirements import Requirement

from jobconfig.loader import deep_merge
from jobconfig.parallel import ParallelConfig
from jobconfig.train import TrainConfig
from parallel.tensor_parallel import gather_tensor_parallel_state_dict

# devices whose collective backend (NCCL, HCCL) runs asynchronously, so communication can overlap compute
OVERLAP_DEVICES = ("cuda", "npu")


def deepspeed_config(pc: ParallelConfig, tc: TrainConfig, dp_size: int, micro_batch: int | None = None,
                     device_type: str = "cpu") -> dict:
    """DeepSpeed's config for this run; `device_type` (cuda, npu, cpu) picks the communication defaults."""
    zero: dict = {"stage": pc.zero_stage}
    if pc.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device_type in OVERLAP_DEVICES, reduce_scatter=True)
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
        "bf16": {"enabled": pc.precision == "bf16", "check_grad_overflow": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if pc.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam; it is AdamW with the same hyper-parameters
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": tc.lr, "betas": list(tc.betas), "eps": tc.eps,
                                                         "weight_decay": tc.weight_decay}}
    return deep_merge(cfg, pc.deepspeed)


PACKAGE = "videogpt-pretrain"


def supported_deepspeed() -> str | None:
    """The DeepSpeed version range this package declares (pyproject.toml), or None when not installed."""
    try:
        requires = importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        req = Requirement(line)
        if req.name == "deepspeed" and not req.marker:
            return str(req.specifier) or None
    return None


def check_deepspeed_version(installed: str | None = None, supported: str | None = None) -> None:
    """Refuse a DeepSpeed outside the declared range: the checkpoint format reads its partitions through
    internals (fragment mappings, ZeRO-3 partitions, the globals of its older .pt files) that change
    between releases, and a silent mismatch would write or load wrong state."""
    from packaging.specifiers import SpecifierSet

    installed = installed or importlib.metadata.version("deepspeed")
    supported = supported if supported is not None else supported_deepspeed()
    if supported and installed not in SpecifierSet(supported, prereleases=True):
        raise RuntimeError(f"deepspeed {installed} is installed; {PACKAGE} supports deepspeed{supported} "
                           f"(pyproject.toml). Install a version in that range: pip install 'deepspeed{supported}'")


def build_engine(model: torch.nn.Module, pc: ParallelConfig, tc: TrainConfig, dp_size: int,
                 make_optimizer: Callable, make_scheduler: Callable, mpu=None, micro_batch: int | None = None,
                 device_type: str = "cpu"):
    """deepspeed.initialize around `model`; returns the engine.

    The optimiser and schedule are the caller's (`make_optimizer(params)`,
    `make_scheduler(optimizer)`), except under ZeRO-Offload, where DeepSpeed's
    own CPU Adam (configured by `deepspeed_config`) replaces the optimiser.
    """
    import deepspeed  # after DeviceSpec.activate(): DeepSpeed picks its accelerator at import

    check_deepspeed_version(deepspeed.__version__)
    config = deepspeed_config(pc, tc, dp_size, micro_batch, device_type)
    optimizer = None if "optimizer" in config else make_optimizer(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler,
                                           config=config, mpu=mpu,
                                           model_parameters=None if optimizer else model.parameters())
    return engine


def gather_full_state_dict(model: torch.nn.Module, zero3: bool, rank: int,
                           tp_group=None) -> dict[str, torch.Tensor] | None:
    """Full-size, plain-model weights on rank 0 (None elsewhere). Collective under ZeRO-3 and TP."""
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with ctx:
        if tp_group is not None:
            sd = gather_tensor_parallel_state_dict(model, tp_group=tp_group)
        else:
            sd = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    return {k: v.cpu() for k, v in sd.items()} if rank == 0 else None
