"""A live DeepSpeed engine's optimizer state, parameter by parameter: the one place that knows
where each ZeRO stage keeps a parameter's fp32 master and Adam moments.

What: the ZeRO stage and ZeRO rank of an engine; this rank's fragment of a
parameter's fp32 master and moments, and where it sits in the parameter
(`fragment`, read and written in place by sharded.py); the whole parameter
set through DeepSpeed's full-tensor API (`set_full_parameter`, portable.py);
Adam's lazily created state made to exist before either; the engine's step,
param-group hyper-parameters, LR scheduler and counters as JSON and back.

Why one module: each stage and precision hides the masters somewhere else
(ZeRO-3 per-parameter partitions, ZeRO-1/2 and the bf16 optimizer's flat
partitions behind `_hp_mapping` views, FP16_Optimizer's per-parameter
masters, the torch optimizer itself under ZeRO-0 in fp32); the same-layout
resume, the async capture and the portable load all need the same answer.
DeepSpeed's fragment APIs (`safe_get_local_*`, `safe_set_full_*`) are used
wherever they exist, so that we stay out of its pickled state layout.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pretrain.checkpoint.full_state import MOMENTS, ConsolidateError, PortableError, jsonable


def _group_rank(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def zero_rank(opt, stage: int) -> int:
    """This rank's place in the group its ZeRO partitions are spread over (0 without ZeRO)."""
    group = getattr(opt, "dp_process_group", None) if stage > 0 else None
    return _group_rank(group)[0]


def masters(opt) -> list[torch.Tensor]:
    """The fp32 master tensors the inner optimizer keeps state for, per DeepSpeed wrapper."""
    for attr in ("fp32_partitioned_groups_flat",   # ZeRO-3
                 "single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition"):      # BF16_Optimizer
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    if hasattr(opt, "fp32_groups"):  # FP16_Optimizer (ZeRO-0 with bf16): per-parameter masters
        return [t for g in opt.fp32_groups for t in g]
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0 in fp32: the torch optimizer itself
        return [p for g in opt.param_groups for p in g["params"]]
    raise PortableError(f"cannot load a portable checkpoint into a {type(opt).__name__} optimizer")


def fp16_master(opt, p) -> torch.Tensor | None:
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp
    return None


def _step_value(base, step: float):
    # torch's Adam/AdamW keep `step` as a float tensor; DeepSpeed's CPU Adam as an int
    return torch.tensor(float(step)) if type(base).__module__.startswith("torch.optim") else int(step)


def prepare_optimizer_state(opt, step: float | None) -> Any:
    """Create the (lazy) Adam state of every master, with `step` (None: keep a step already there, else
    0), and link DeepSpeed's fragment views to it; returns the inner optimizer."""
    base = getattr(opt, "optimizer", opt)
    for m in masters(opt):
        st = base.state[m]
        if step is not None or "step" not in st:
            st["step"] = _step_value(base, step or 0.0)
        for k in MOMENTS:
            if k not in st:
                st[k] = torch.zeros_like(m)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and the bf16 optimizer point each parameter's fragment at views of this state
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    return base


# ---------------------------------------------------------------- this rank's fragment of a parameter
def fragment(opt, base, p: torch.nn.Parameter):
    """(fp32 fragment, {moment: fragment}, start, numel) of `p` held by this rank, or None."""
    if hasattr(p, "ds_id"):  # ZeRO-3: every rank holds ceil(numel / dp) elements of every parameter
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        start, part = zero3_partition(p)
        return (safe_get_local_fp32_param(p), {k: safe_get_local_optimizer_state(p, k) for k in MOMENTS},
                start, part)
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: a view into this rank's flat partition
        mapping = p._hp_mapping
        if mapping is None:
            return None
        addr = mapping.lp_fragment_address
        return mapping.hp_fragment, {k: mapping.get_optim_state_fragment(k) for k in MOMENTS}, addr.start, addr.numel
    master = fp16_master(opt, p) if hasattr(opt, "fp32_groups") else p  # ZeRO-0: whole masters
    if master is None:
        raise ConsolidateError(f"no fp32 master for a parameter of shape {tuple(p.shape)} in {type(opt).__name__}")
    state = base.state[master]
    return master, {k: state[k] for k in MOMENTS}, 0, master.numel()


def zero3_partition(p: torch.nn.Parameter) -> tuple[int, int]:
    """(first element, elements) of ZeRO-3 parameter `p` that this rank's partition holds (the last
    ranks' partitions run past its end, padded)."""
    part = p.ds_tensor.ds_numel
    return _group_rank(p.ds_process_group)[0] * part, part


def set_zero3_local(p: torch.nn.Parameter, fp32: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """This rank's ZeRO-3 partition of `p`'s fp32 master and moments, through DeepSpeed's local setters
    (the fragment views `fragment` returns for ZeRO-3 are copies)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    safe_set_local_fp32_param(p, fp32.to(p.ds_tensor.device))
    for k, v in moments.items():
        safe_set_local_optimizer_state(p, v.to(p.ds_tensor.device), k)


# ---------------------------------------------------------------- a whole parameter
def set_full_parameter(opt, base, p: torch.nn.Parameter, w: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """`p`, its fp32 master and its moments from full-size (TP-local) tensors, on any ZeRO stage."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id"):  # ZeRO-3: write the gathered parameter, DeepSpeed re-partitions it
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(w.view_as(p.data).to(p.dtype))
    else:
        p.data.copy_(w.view_as(p.data).to(p.dtype))
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # partitioned fp32 masters and moments
        safe_set_full_fp32_param(p, w)
        for k, v in moments.items():
            safe_set_full_optimizer_state(p, v, k)
        return
    master = fp16_master(opt, p) if hasattr(opt, "fp32_groups") else p
    if master is None:
        raise PortableError(f"no fp32 master found for a parameter of shape {tuple(p.shape)} in "
                            f"{type(opt).__name__}")
    master.data.copy_(w.view_as(master))
    for k, v in moments.items():
        base.state[master][k].copy_(v.view_as(master))


# ---------------------------------------------------------------- step, hyper-parameters, scheduler, counters
def engine_info(engine, base) -> dict[str, Any]:
    """What a checkpoint's JSON keeps of the engine beside the tensors (FullState.optimizer)."""
    states = [s for s in base.state.values() if "step" in s]
    step = float(states[0]["step"]) if states else 0.0
    hyper = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return jsonable({"step": step, "hyper": hyper, "lr_scheduler": sched,
                     "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                     "skipped_steps": engine.skipped_steps}, "optimizer")


def restore_engine_info(engine, base, info: dict[str, Any]) -> None:
    """Param-group hyper-parameters, LR scheduler state and engine counters of a checkpoint's JSON."""
    for group in base.param_groups:  # hyper-parameters the schedule moves (lr, initial_lr, ...)
        for k, v in info.get("hyper", {}).items():
            if k in group and k != "params":
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
    if engine.lr_scheduler is not None and info.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(dict(info["lr_scheduler"]))
    for k in ("global_steps", "global_samples", "skipped_steps"):
        if info.get(k) is not None:
            setattr(engine, k, int(info[k]))
