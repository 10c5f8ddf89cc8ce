"""A checkpoint's training state as full-size tensors of the plain model: what every format reads into.

What: `FullState`, the fp32 master weights (and buffers), the Adam moments,
the optimizer's step, hyper-parameters, LR-scheduler state and engine counters
(JSON values), and the layout that wrote them; `merge_tensor_parallel`, which
puts tensor-parallel shards back together by the model's TP plan.

Why a module of its own: the three formats (formats.py) meet here. The
sharded and legacy .pt readers produce a FullState from whatever layout wrote
them; the portable form writes one out and `vgpt ckpt export/inspect` take its
weights. None of them owns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parallel.tensor_parallel import plan_style, unshard_tensor
from pretrain.checkpoint.integrity import RefusedFile

MOMENTS = ("exp_avg", "exp_avg_sq")


class ConsolidateError(RefusedFile):
    """The checkpoint's files do not hold what this reader expects; the message names file and key.
    No retry changes a file: a refusal (one line; exit 2 and no restart under `vgpt train`)."""


class PortableError(RefusedFile):
    """A portable checkpoint does not fit the model or engine; the message names file and key."""


@dataclass
class FullState:
    weights: dict[str, torch.Tensor]  # fp32 masters (and buffers), plain-model names and shapes
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "exp_avg" -> {name: tensor}
    optimizer: dict[str, Any] = field(default_factory=dict)  # step, hyper, lr_scheduler, engine counters
    source: dict[str, Any] = field(default_factory=dict)  # zero_stage, tp, dp, bf16 of the writer


def jsonable(v: Any, key: str):
    """`v` (a FullState.optimizer entry) as JSON values; one-element tensors become numbers."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if torch.is_tensor(v) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [jsonable(x, key) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x, f"{key}.{k}") for k, x in v.items()}
    raise PortableError(f"optimizer state {key}: a {type(v).__name__} cannot be stored in optimizer.json")


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], plan: dict[str, str] | None, ckpt: Path) -> dict:
    """Undo tensor parallelism: sharded parameters are concatenated by their plan style,
    replicated ones (norms, embedders, the head) are taken from TP rank 0."""
    if len(shards) == 1:
        return shards[0]
    if not plan:
        raise ConsolidateError(f"{ckpt}: {len(shards)} tensor-parallel ranks but no tensor-parallel plan to merge "
                               "them with (trainer_state.json layout.tp_plan)")
    for t, s in enumerate(shards[1:], start=1):
        if s.keys() != shards[0].keys():
            diff = sorted(set(s) ^ set(shards[0]))[:3]
            raise ConsolidateError(f"{ckpt}: tensor-parallel rank {t} holds other parameters than rank 0: {diff}")
    out = {}
    for name, t0 in shards[0].items():
        style = plan_style(name.rpartition(".")[0], plan)
        out[name] = t0 if style is None else unshard_tensor([s[name] for s in shards], style)
    return out
