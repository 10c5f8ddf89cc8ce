"""Tensor parallelism applied from outside to the plain model, with megatron-core layers.

The plan is data, given by the model family (e.g. pretrain/training/parallelize.py):
module-name pattern (fnmatch, `*` also spans dots) -> style.

  column         Y = X A^T, A's output rows split over TP ranks; output stays sharded
  column_fusedN  as column, for an output that is N projections concatenated
                 ([q|k|v]: N=3, [gate|up]: N=2); each part is split separately
                 and the local pieces re-concatenated, so the local layer still
                 emits [q_local|k_local|v_local] and the model's own
                 `view`/`chunk` sees H/tp heads (or mlp/tp gate and up units)
  row            input columns split; the partial products are all-reduced

`apply_tensor_parallel` swaps each matched `nn.Linear` for a megatron-core
`ColumnParallelLinear` / `RowParallelLinear` holding this rank's shard of the
existing weights: every rank builds the same full model (same seed or the
same loaded checkpoint) and keeps its slice, so TP never changes the function.
Column layers' backward all-reduces the input gradient and row layers'
forward all-reduces the output (megatron's copy/reduce regions), so
everything outside the plan (norms, embedders, head) stays replicated with
identical gradients on all TP ranks.

The swapped modules subclass the megatron layers only to return the output
tensor instead of megatron's (output, bias) tuple; subclassing rather than
wrapping keeps parameter names identical to the plain model's
(`...qkv_proj.weight`), so optimizer state, checkpoints and the export map
one-to-one. megatron adds an empty `_extra_state` entry to their state dicts.

`gather_tensor_parallel_state_dict` is the inverse, for export: the full-size
state dict of the plain model, collective over the TP group.
"""
from __future__ import annotations

import fnmatch
import re

import torch
import torch.distributed as dist
import torch.nn as nn

from jobconfig.errors import ConfigError

_STYLE = re.compile(r"^(column|row|column_fused([1-9]))$")


def _parts(style: str) -> int:
    m = _STYLE.match(style)
    if not m:
        raise ConfigError(f"tensor-parallel plan: style {style!r}, expected 'column', 'row' or 'column_fusedN'")
    return int(m.group(2) or 1)


# ---------------------------------------------------------------- shard arithmetic
def shard_tensor(full: torch.Tensor, style: str, rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of a full Linear weight [out, in] (or a column bias [out]) for `style`."""
    if style == "row":
        return full.chunk(tp, dim=-1)[rank] if full.dim() == 2 else full  # row bias is not split
    parts = full.chunk(_parts(style), dim=0)
    return torch.cat([p.chunk(tp, dim=0)[rank] for p in parts], dim=0)


def unshard_tensor(shards: list[torch.Tensor], style: str) -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's piece in TP-rank order."""
    if style == "row":
        return torch.cat(shards, dim=-1) if shards[0].dim() == 2 else shards[0]
    n = _parts(style)
    per_rank = [s.chunk(n, dim=0) for s in shards]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim=0) for i in range(n)], dim=0)


# ---------------------------------------------------------------- layers
_classes: dict[str, type] = {}


def _layer_classes() -> tuple[type, type]:
    """megatron-backed Linear subclasses, defined on first use (megatron import is slow)."""
    if not _classes:
        from megatron.core import tensor_parallel as mtp

        class TPColumnLinear(mtp.ColumnParallelLinear):
            def forward(self, x):
                return super().forward(x)[0]

        class TPRowLinear(mtp.RowParallelLinear):
            def forward(self, x):
                return super().forward(x)[0]

        _classes.update(column=TPColumnLinear, row=TPRowLinear)
    return _classes["column"], _classes["row"]


def _tp_group_or_default(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("apply_tensor_parallel: no tp_group given and megatron parallel state "
                           "is not initialised (call parallel.dims.build_process_groups)")
    return ps.get_tensor_model_parallel_group()


def _build_layer(lin: nn.Linear, style: str, tp_group, rank: int, tp: int) -> nn.Module:
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    column_cls, row_cls = _layer_classes()
    w = lin.weight
    # weights are copied in below: skip megatron's init (and its full-size master weight)
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False, gradient_accumulation_fusion=False,
                                 params_dtype=w.dtype, sequence_parallel=False)
    kw = dict(config=config, init_method=nn.init.zeros_, bias=lin.bias is not None,
              skip_bias_add=False, tp_group=tp_group)
    if style == "row":
        layer = row_cls(lin.in_features, lin.out_features, input_is_parallel=True, **kw)
    else:
        layer = column_cls(lin.in_features, lin.out_features, gather_output=False, **kw)
    layer.to(w.device)  # megatron allocates on CPU (use_cpu_initialization); shard on the device
    with torch.no_grad():
        layer.weight.copy_(shard_tensor(w.detach(), style, rank, tp))
        if lin.bias is not None:
            layer.bias.copy_(shard_tensor(lin.bias.detach(), style, rank, tp))
    layer.weight.requires_grad_(w.requires_grad)
    # megatron tags sharded weights only inside its own init, which we skip; DeepSpeed's
    # grad-norm and megatron's helpers read these tags to tell shards from replicas
    set_tensor_model_parallel_attributes(layer.weight, True, 1 if style == "row" else 0, 1)
    layer.tp_style = style  # read by gather_tensor_parallel_state_dict
    return layer


def _match(plan: dict[str, str], model: nn.Module) -> list[tuple[str, str]]:
    """(module name, style) for every plan entry; each pattern must match Linear modules."""
    names = dict(model.named_modules())
    matched: dict[str, str] = {}
    for pattern, style in plan.items():
        _parts(style)
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"tensor-parallel plan: pattern {pattern!r} matches no module of "
                              f"{type(model).__name__}")
        for n in hits:
            if not isinstance(names[n], nn.Linear):
                raise ConfigError(f"tensor-parallel plan: {n!r} (matched by {pattern!r}) is a "
                                  f"{type(names[n]).__name__}, expected nn.Linear")
            if matched.get(n, style) != style:
                raise ConfigError(f"tensor-parallel plan: {n!r} matched with styles {matched[n]!r} and {style!r}")
            matched[n] = style
    return list(matched.items())


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], tp_group=None) -> nn.Module:
    """Shard `model` in place over `tp_group` (default: megatron's TP group) following `plan`.

    Every TP rank must call it with the same full weights. Shapes are checked
    before anything is replaced: a width that does not split evenly is a
    ConfigError naming the module and the numbers. With a TP group of one
    rank the model is returned unchanged.
    """
    tp_group = _tp_group_or_default(tp_group)
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if tp == 1:
        return model
    targets = _match(plan, model)
    for name, style in targets:
        lin = model.get_submodule(name)
        width = lin.in_features if style == "row" else lin.out_features // _parts(style)
        if width % tp or (style != "row" and lin.out_features % _parts(style)):
            raise ConfigError(f"tensor parallel: {name} ({style}) has width {width}, "
                              f"not divisible by parallel.tensor_parallel={tp}")
    for name, style in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _build_layer(getattr(parent, child), style, tp_group, rank, tp))
    return model


def plan_style(module_name: str, plan: dict[str, str]) -> str | None:
    """The style `plan` gives the module `module_name` (None: replicated), matched as
    `apply_tensor_parallel` matches; for offline tools that see parameter names, not modules."""
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            _parts(style)
            return style
    return None


def tensor_parallel_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> swapped layer, for every module `apply_tensor_parallel` replaced."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "tp_style")}


def gather_tensor_parallel_state_dict(model: nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """The full-size (plain model) state dict of a TP-sharded model; collective over `tp_group`.

    Every TP rank gets the whole dict (detached tensors on the parameters'
    device); megatron's `_extra_state` entries are dropped. Under ZeRO-3 the
    parameters must be gathered first (deepspeed.zero.GatheredParameters).
    """
    tp_group = _tp_group_or_default(tp_group)
    tp = dist.get_world_size(tp_group)
    sharded = tensor_parallel_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("._extra_state") or key == "_extra_state":
            continue
        owner, _, pname = key.rpartition(".")
        style = getattr(sharded.get(owner), "tp_style", None)
        if style is None or tp == 1 or (style == "row" and pname == "bias"):
            out[key] = value.detach().clone()
            continue
        pieces = [torch.empty_like(value) for _ in range(tp)]
        dist.all_gather(pieces, value.detach().contiguous(), group=tp_group)
        out[key] = unshard_tensor(pieces, style)
    return out
