"""Our checkpoint format for a live DeepSpeed engine: each rank's ZeRO partition in safetensors,
everything else in JSON. Nothing in it is a pickle, and capturing it is a copy into host memory.

    step_N/rank-00003.safetensors  rank 3's share of the training state, per parameter (plain-model names):
                                   "fp32/<name>" its fp32 master fragment, "exp_avg/<name>",
                                   "exp_avg_sq/<name>" the Adam moments of that fragment, and under
                                   ZeRO-3 "module/<name>" its partition of the bf16/fp32 module
                                   parameter; the header metadata says where each fragment sits in
                                   its (tensor-parallel-local) parameter and which TP/ZeRO rank wrote it
    step_N/model-tp00.safetensors  the module's parameters and buffers of TP rank 0 (ZeRO-0/1/2 hold them
                                   whole on every rank; ZeRO rank 0 of each TP rank writes them; under
                                   ZeRO-3 only the buffers)
    step_N/engine.json             format, Adam step, param-group hyper-parameters, LR scheduler state,
                                   engine counters, the writer's layout

Why: DeepSpeed's own files are pickles of its objects; a checkpoint folder in
a shared bucket is then a way to run code on every machine that resumes from
it (checksums catch corruption, not forgery). Reading partitions through
DeepSpeed's fragment views (`_hp_mapping` for ZeRO-1/2 and the bf16
optimizer, the ZeRO-3 local API) keeps us out of its pickled state layout, and
`capture` is all the training loop waits for in an async save (manager.py).

Where each ZeRO stage keeps a parameter's fragment: optimizer_fragments.py.
A resume on the same layout reads back only its own rank file (`load_sharded`).
A resume on any other layout, and `vgpt ckpt reshard`, read each parameter's
fragments by byte range (fragment_reader.py; resharded_load.py, reshard.py).
`vgpt ckpt export/inspect` go through `read_sharded` (formats.py opens it):
full-size fp32 weights put together from the fragments (a FullState, as
deepspeed_files.read_checkpoint gives for the older .pt checkpoints).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from pretrain.checkpoint import schema
from pretrain.checkpoint.full_state import MOMENTS, ConsolidateError, FullState, merge_tensor_parallel
from pretrain.checkpoint.optimizer_fragments import (
    engine_info,
    fragment,
    prepare_optimizer_state,
    restore_engine_info,
    set_zero3_local,
    zero_rank,
    zero_stage,
)
from pretrain.checkpoint.safetensors_stream import write_safetensors

FORMAT = schema.SHARDED_FORMAT
ENGINE = schema.ENGINE
META_KEY = schema.META_KEY


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def model_file(tp_rank: int) -> str:
    return f"model-tp{tp_rank:02d}.safetensors"


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / ENGINE).is_file()


def read_engine(ckpt: Path) -> dict[str, Any]:
    """engine.json, refused unless it follows its schema (schema.engine_json)."""
    return schema.engine_json(schema.read_json(ckpt / ENGINE), ckpt / ENGINE, FORMAT)


def _fits(path: Path, name: str, got: torch.Size | tuple, want: torch.Size | tuple) -> None:
    """A tensor of the checkpoint against the live model's (a view_as of the same size would take
    a transposed weight without a word)."""
    if tuple(got) != tuple(want):
        raise ConsolidateError(f"{path}: tensor {name!r} has shape {tuple(got)}, the model expects {tuple(want)}")


@dataclass
class Captured:
    """One rank's state in host memory, ready to be written while training goes on."""
    rank: int
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = field(default_factory=dict)
    engine: dict[str, Any] | None = None  # engine.json (rank 0)


# ---------------------------------------------------------------- what this rank holds
class HostBuffers:
    """Host copies reused from one save to the next (pinned when the state lives on an accelerator:
    pinning is slow to allocate, fast to copy into)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self.buffers[key] = buf
        buf.copy_(t, non_blocking=t.device.type != "cpu")
        return buf


def capture(engine, model: torch.nn.Module, layout: dict[str, Any], rank: int, tp_rank: int,
            buffers: HostBuffers) -> Captured:
    """Copy this rank's share of the training state into host memory. Collective-free; the caller
    synchronises the device once after it (non-blocking copies)."""
    opt = engine.optimizer
    base = prepare_optimizer_state(opt, step=None)  # links fragment views; makes the state if none yet
    stage = zero_stage(engine)
    tensors, fragments = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            frag = fragment(opt, base, p)
            if frag is None:
                continue
            hp, moments, start, numel = frag
            shape = list(p.ds_shape) if hasattr(p, "ds_id") else list(p.shape)
            fragments[name] = [int(start), int(numel), shape]
            tensors[f"fp32/{name}"] = buffers.copy(f"fp32/{name}", hp.reshape(-1))
            for k, v in moments.items():
                tensors[f"{k}/{name}"] = buffers.copy(f"{k}/{name}", v.reshape(-1))
            if hasattr(p, "ds_id"):
                tensors[f"module/{name}"] = buffers.copy(f"module/{name}", p.ds_tensor.reshape(-1))
    z_rank = zero_rank(opt, stage)
    meta = {"format": FORMAT, "rank": rank, "tp_rank": tp_rank, "zero_rank": z_rank, "zero_stage": stage,
            "fragments": fragments}
    out = Captured(rank)
    out.files[rank_file(rank)] = (tensors, {META_KEY: json.dumps(meta)})
    if z_rank == 0:  # one copy of the module per TP rank
        module = {n: p for n, p in model.named_parameters() if not hasattr(p, "ds_id")}
        persistent = model.state_dict(keep_vars=True)  # buffers a state dict carries (not derived tables)
        module.update({n: b for n, b in model.named_buffers() if n in persistent})
        out.files[model_file(tp_rank)] = ({n: buffers.copy(f"model/{n}", t.contiguous()) for n, t in module.items()},
                                          {META_KEY: json.dumps({"format": FORMAT, "tp_rank": tp_rank})})
    if rank == 0:
        out.engine = {"format": FORMAT, "optimizer": engine_info(engine, base), "layout": layout,
                      "source": {"zero_stage": stage, "tp": layout.get("tp", 1),
                                 "dp": layout.get("dp", 1) * layout.get("sp", 1),
                                 "bf16": layout.get("precision") == "bf16"}}
    return out


def write_captured(captured: Captured, ckpt: Path, on_write: Callable[[int], None] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Write one rank's captured state into `ckpt`; returns {file name: manifest entry}."""
    written = {}
    for name, (tensors, metadata) in captured.files.items():
        written[name] = write_safetensors(ckpt / name, tensors, metadata, on_write=on_write)
    if captured.engine is not None:
        (ckpt / ENGINE).write_text(json.dumps(captured.engine, indent=1))
    return written


# ---------------------------------------------------------------- same layout: back into the engine
def load_sharded(engine, model: torch.nn.Module, ckpt: Path, rank: int, tp_rank: int) -> dict[str, Any]:
    """This rank's own file (and its TP rank's module file) back into `engine`. Collective-free except
    for what DeepSpeed's ZeRO-3 local setters do. Returns engine.json."""
    meta = read_engine(ckpt)
    opt = engine.optimizer
    base = prepare_optimizer_state(opt, step=meta["optimizer"]["step"])
    mine, module_path = ckpt / rank_file(rank), ckpt / model_file(tp_rank)
    if not module_path.is_file():
        module_path = None
    with safe_open(str(mine), "pt") as f, torch.no_grad():
        info = schema.parse_json((f.metadata() or {}).get(META_KEY, ""), f"{mine} (header __metadata__.{META_KEY})")
        if not isinstance(info, dict) or not isinstance(info.get("fragments"), dict):
            raise ConsolidateError(f"{mine}: header __metadata__.{META_KEY}: expected an object with 'fragments'")
        if info.get("tp_rank") != tp_rank:
            raise ConsolidateError(f"{mine}: written by TP rank {info.get('tp_rank')}, loading as TP rank {tp_rank}")
        module = safe_open(str(module_path), "pt") if module_path else None
        for name, p in model.named_parameters():
            if hasattr(p, "ds_id"):  # ZeRO-3: the module partition here, the fp32 ones through the API below
                _fits(mine, f"module/{name}", f.get_slice(f"module/{name}").get_shape(), (p.ds_tensor.numel(),))
                p.ds_tensor.copy_(f.get_tensor(f"module/{name}").view_as(p.ds_tensor))
                continue
            if module is not None:
                _fits(module_path, name, module.get_slice(name).get_shape(), p.shape)
                p.data.copy_(module.get_tensor(name))
            frag = fragment(opt, base, p)
            if frag is None:
                continue
            if name not in info["fragments"]:
                raise ConsolidateError(f"{mine}: no fragment of {name!r}, which this rank holds")
            hp, moments, start, _ = frag
            if info["fragments"][name][:2] != [int(start), hp.numel()]:
                raise ConsolidateError(f"{mine}: fragment of {name!r} at {info['fragments'][name][:2]} (start, "
                                       f"numel), this rank holds [{int(start)}, {hp.numel()}]")
            for k, dst in (("fp32", hp), *moments.items()):
                _fits(mine, f"{k}/{name}", f.get_slice(f"{k}/{name}").get_shape(), (dst.numel(),))
                dst.data.copy_(f.get_tensor(f"{k}/{name}").view_as(dst))
        if module is not None:
            for name, buf in model.named_buffers():
                if name in module.keys():
                    _fits(module_path, name, module.get_slice(name).get_shape(), buf.shape)
                    buf.copy_(module.get_tensor(name))
        for name, p in model.named_parameters():
            if hasattr(p, "ds_id"):  # once every module partition is in place
                set_zero3_local(p, f.get_tensor(f"fp32/{name}"), {k: f.get_tensor(f"{k}/{name}") for k in MOMENTS})
    restore_engine_info(engine, base, meta["optimizer"])
    return meta


# ---------------------------------------------------------------- any layout: full tensors, offline
def read_sharded(ckpt: str | Path, with_optimizer: bool = True, tp_plan: dict[str, str] | None = None
                 ) -> FullState:
    """Full-size fp32 weights (and Adam moments) of a checkpoint in this format, from its fragments."""
    ckpt = Path(ckpt)
    meta = read_engine(ckpt)  # the rank files' headers: checked by structure.py when the checkpoint verified
    kinds = ("fp32", *(MOMENTS if with_optimizer else ()))
    per_tp: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    covered: dict[tuple[int, str], int] = {}
    shapes: dict[tuple[int, str], list[int]] = {}
    for path in sorted(ckpt.glob("rank-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            info = schema.parse_json((f.metadata() or {}).get(META_KEY, ""), f"{path} (header __metadata__.{META_KEY})")
            tp = int(info["tp_rank"])
            full = per_tp.setdefault(tp, {k: {} for k in kinds})
            for name, (start, numel, shape) in info["fragments"].items():
                total = int(torch.Size(shape).numel())
                take = max(0, min(numel, total - start))  # ZeRO-3 pads the last rank's partition
                shapes[(tp, name)] = shape
                for k in kinds:
                    dst = full[k].setdefault(name, torch.zeros(total, dtype=torch.float32))
                    dst[start:start + take] = f.get_tensor(f"{k}/{name}")[:take].float()
                covered[(tp, name)] = covered.get((tp, name), 0) + take
    if not per_tp:
        raise ConsolidateError(f"{ckpt}: no rank-*.safetensors files")
    for (tp, name), n in covered.items():
        total = int(torch.Size(shapes[(tp, name)]).numel())
        if n != total:
            raise ConsolidateError(f"{ckpt}: the fragments of {name!r} (TP rank {tp}) cover {n} of its {total} "
                                   "elements (a rank file is missing)")
    weights_tp, moments_tp = [], {k: [] for k in kinds if k != "fp32"}
    for tp in sorted(per_tp):
        weights = {n: t.view(shapes[(tp, n)]) for n, t in per_tp[tp]["fp32"].items()}
        module = ckpt / model_file(tp)
        if module.is_file():
            with safe_open(str(module), "pt") as f:
                for n in f.keys():
                    if n not in weights:  # buffers
                        weights[n] = f.get_tensor(n)
        weights_tp.append(weights)
        for k in moments_tp:
            moments_tp[k].append({n: t.view(shapes[(tp, n)]) for n, t in per_tp[tp][k].items()})
    if sorted(per_tp) != list(range(len(per_tp))):
        raise ConsolidateError(f"{ckpt}: tensor-parallel ranks {sorted(per_tp)} on disk, expected 0..{len(per_tp) - 1}")
    weights = merge_tensor_parallel(weights_tp, tp_plan, ckpt)
    moments = {k: merge_tensor_parallel(v, tp_plan, ckpt) for k, v in moments_tp.items()}
    return FullState(weights, moments, meta["optimizer"], meta.get("source", {}))
