"""DeepSpeed's checkpoint files: written with hashing, read offline into full-size, plain-model tensors.

What: for every parameter of the plain (unsharded) model, its fp32 master
weight and, when asked, its Adam moments (`exp_avg`, `exp_avg_sq`), put
together from whatever layout wrote the checkpoint: ZeRO 0/1/2/3, fp32 or
bf16, any data-parallel size, any tensor-parallel size (our megatron-core TP
plan, parallel/tensor_parallel.py); plus the optimizer step, the param-group
hyper-parameters, the LR-scheduler state and the engine's step counters.
`vgpt ckpt export/inspect/reshard` and a resume on another layout use it.

Why not DeepSpeed's own tools: `zero_to_fp32` reads only `mp_rank_00` (TP rank
0) and no optimizer state; `ds_to_universal` merges TP shards only through the
UNIVERSAL_CHECKPOINT_INFO patterns that Megatron-LM or AutoTP register, its
ZeRO-3 loader re-slices only AutoTP parameters, it writes one pickle per
parameter and tensor kind, and neither tool knows ZeRO-0. The files read here,
as DeepSpeed 0.19 writes them:

  ZeRO-0    mp_rank_TT_model_states.pt: 'module' (this TP rank's shard) and
            'optimizer': the torch optimizer's state_dict (fp32 run), or
            FP16_Optimizer's {'fp32_groups', 'optimizer_state_dict'} (bf16 run)
  ZeRO-1/2  [bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt: per param group
            the rank's flat fp32 partition, the Adam state of that partition,
            and 'param_slice_mappings' (name -> start and numel of the piece of
            each parameter inside this partition; pieces are in rank order)
  ZeRO-3    zero_pp_rank_D_mp_rank_TT_optim_states.pt: 'fp32_flat_groups' in
            which every parameter, in 'param_shapes' order (from the matching
            model_states file), owns ceil(numel / dp) elements on every rank

These .pt files are what checkpoints of earlier versions hold (this version
writes sharded.py's safetensors format). They are pickles, read only with
`torch.load(weights_only=True)` and an allow-list of the three DeepSpeed types
they carry (`load_legacy`): a pickled payload is refused, never run.
`formats.open_checkpoint` verifies the directory against our manifest first.
The result is a full_state.FullState, as every format reads into.

Writing: `HashingCheckpointEngine` (installed on a live engine by `install`)
is DeepSpeed's own torch checkpoint engine with every file saved through an
integrity.HashingWriter (hashed while written, fsynced) and loaded with mmap.
"""
from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.full_state import MOMENTS, ConsolidateError, FullState, merge_tensor_parallel
from pretrain.checkpoint.integrity import CheckpointError, HashingWriter, RefusedFile

_MODEL_Z012 = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_MODEL_Z3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def legacy_globals() -> list:
    """The only non-tensor objects DeepSpeed 0.16-0.19 pickles into its checkpoint files; everything else
    in them is tensors, containers and numbers, which `weights_only` loads without running any code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_legacy(path: str | Path, map_location="cpu", mmap: bool = True):
    """One of DeepSpeed's .pt files, read with `torch.load(weights_only=True)` and the allow-list above:
    a file carrying any other object (a pickled payload) is refused, not run."""
    try:
        with torch.serialization.safe_globals(legacy_globals()):
            # mmap: tensors are paged in when sliced, not all at once (zip format only)
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise RefusedFile(f"{path}: refused: it holds objects other than tensors and DeepSpeed's known "
                              f"types ({str(e).splitlines()[0][:200]})") from None


def _get(d: dict, key: str, where: Path):
    if not isinstance(d, dict) or key not in d:
        raise ConsolidateError(f"{where}: no {key!r} entry (expected a DeepSpeed 0.19 checkpoint file)")
    return d[key]


def _scalar(v) -> float:
    return float(v.item() if torch.is_tensor(v) else v)


def _hyper(param_group: dict) -> dict:
    return {k: v for k, v in param_group.items() if k != "params"}


def model_files(ckpt: Path) -> tuple[bool, dict[int, Path]]:
    """(zero-3?, {tp_rank: model_states file of dp rank 0}) of a checkpoint directory."""
    z012, z3 = {}, {}
    for p in ckpt.iterdir():
        if m := _MODEL_Z012.match(p.name):
            z012[int(m.group(1))] = p
        elif (m := _MODEL_Z3.match(p.name)) and int(m.group(1)) == 0:
            z3[int(m.group(2))] = p
    files = z3 or z012
    if not files:
        raise ConsolidateError(f"{ckpt}: no mp_rank_*_model_states.pt or zero_pp_rank_*_model_states.pt file "
                               "(not a DeepSpeed checkpoint)")
    if sorted(files) != list(range(len(files))):
        raise ConsolidateError(f"{ckpt}: tensor-parallel ranks {sorted(files)} on disk, expected 0..{len(files) - 1}")
    return bool(z3), files


def _optim_file(ckpt: Path, dp: int, tp: int) -> Path:
    for prefix in ("", "bf16_"):
        p = ckpt / f"{prefix}zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt"
        if p.is_file():
            return p
    raise ConsolidateError(f"{ckpt}: missing zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt "
                           f"(data-parallel rank {dp} of tensor-parallel rank {tp})")


def _param_shapes(meta: dict, where: Path) -> dict[str, torch.Size]:
    groups = _get(meta, "param_shapes", where)
    if meta.get("frozen_param_shapes"):
        raise ConsolidateError(f"{where}: frozen parameters {list(meta['frozen_param_shapes'])[:3]} are not "
                               "supported (every parameter of Video-GPT trains)")
    return {k: torch.Size(v) for g in groups for k, v in g.items()}


# ---------------------------------------------------------------- one tensor-parallel rank
def _rank_zero0(meta: dict, where: Path, with_optimizer: bool):
    module = _get(meta, "module", where)
    buffers = set(meta.get("buffer_names") or [])
    names = [k for k, v in module.items() if torch.is_tensor(v) and k not in buffers]
    opt = meta.get("optimizer")
    if opt is None:
        if with_optimizer:
            raise ConsolidateError(f"{where}: 'optimizer' is empty (saved without optimizer state)")
        return {n: module[n].float() for n in names}, {}, {}
    if "fp32_groups" in opt:  # FP16_Optimizer (bf16 run): fp32 masters next to the bf16 module
        masters = [t for g in opt["fp32_groups"] for t in g]
        osd = _get(opt, "optimizer_state_dict", where)
    else:
        masters, osd = [module[n] for n in names], opt
    if len(masters) != len(names):
        raise ConsolidateError(f"{where}: {len(masters)} optimizer parameters but {len(names)} module parameters")
    weights = {n: m.float().reshape(module[n].shape) for n, m in zip(names, masters)}
    order = [i for g in osd["param_groups"] for i in g["params"]]
    moments: dict = {k: {} for k in MOMENTS} if with_optimizer else {}
    steps = set()
    for n, i in zip(names, order):
        st = osd["state"].get(i)
        if st is None:
            raise ConsolidateError(f"{where}: no optimizer state for parameter {n!r} (index {i})")
        for k in moments:
            moments[k][n] = _get(st, k, where).float().reshape(module[n].shape)
        steps.add(_scalar(st["step"]))
    return weights, moments, {"step": max(steps, default=0.0), "hyper": _hyper(osd["param_groups"][0])}


def _rank_zero12(ckpt: Path, meta: dict, where: Path, tp: int, dp: int, with_optimizer: bool):
    shapes = _param_shapes(meta, where)
    pieces: dict[str, dict[str, list]] = {k: {} for k in ("fp32", *MOMENTS)}
    info: dict = {}
    for d in range(dp):
        f = _optim_file(ckpt, d, tp)
        osd = _get(load_legacy(f), "optimizer_state_dict", f)
        fp32 = _get(osd, "single_partition_of_fp32_groups", f)
        base = _get(osd, "base_optimizer_state", f)
        states = base["state"] if isinstance(base, dict) else base  # rigid: torch state_dict; elastic: list
        if d == 0 and isinstance(base, dict):
            info = {"step": _scalar(states[0]["step"]), "hyper": _hyper(base["param_groups"][0])}
        for g, mapping in enumerate(_get(osd, "param_slice_mappings", f)):
            for name, frag in mapping.items():
                pieces["fp32"].setdefault(name, []).append(fp32[g].narrow(0, frag.start, frag.numel))
                for k in MOMENTS if with_optimizer else ():
                    pieces[k].setdefault(name, []).append(_get(states[g], k, f).narrow(0, frag.start, frag.numel))
    if with_optimizer and not info:
        raise ConsolidateError(f"{ckpt}: elastic ZeRO checkpoints carry no param groups; save with "
                               "zero_optimization.elastic_checkpoint=false")
    out = {k: {} for k in pieces if k == "fp32" or with_optimizer}
    for kind in out:
        for name, shape in shapes.items():
            parts = pieces[kind].get(name)
            if not parts:
                raise ConsolidateError(f"{ckpt}: parameter {name!r} of tensor-parallel rank {tp} has no {kind} "
                                       f"fragment in any of the {dp} optimizer files")
            flat = torch.cat(parts).float()
            if flat.numel() != shape.numel():
                raise ConsolidateError(f"{ckpt}: parameter {name!r} (tp rank {tp}): fragments hold {flat.numel()} "
                                       f"elements, param_shapes says {tuple(shape)}")
            out[kind][name] = flat.view(shape)
    weights = out.pop("fp32")
    module = meta.get("module") or {}
    for b in meta.get("buffer_names") or []:
        weights[b] = module[b]
    return weights, out, info


def _rank_zero3(ckpt: Path, meta: dict, where: Path, tp: int, dp: int, with_optimizer: bool):
    shapes = _param_shapes(meta, where)
    flats: dict[str, list[torch.Tensor]] = {k: [] for k in ("fp32", *(MOMENTS if with_optimizer else ()))}
    info: dict = {}
    for d in range(dp):
        f = _optim_file(ckpt, d, tp)
        osd = _get(load_legacy(f), "optimizer_state_dict", f)
        flats["fp32"].append(torch.cat(list(_get(osd, "fp32_flat_groups", f))))
        inner = _get(osd, "optimizer_state_dict", f)
        sub_groups = [inner["state"][i] for i in sorted(inner["state"])]
        if d == 0 and sub_groups:
            info = {"step": _scalar(sub_groups[0]["step"]), "hyper": _hyper(inner["param_groups"][0])}
        for k in MOMENTS if with_optimizer else ():
            flats[k].append(torch.cat([_get(s, k, f) for s in sub_groups]))
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in flats}
    offset = 0
    for name, shape in shapes.items():
        n = shape.numel()
        part = math.ceil(n / dp)  # every rank holds `part` elements of every parameter, zero padded
        for kind, per_rank in flats.items():
            out[kind][name] = torch.cat([r.narrow(0, offset, part) for r in per_rank])[:n].float().view(shape)
        offset += part
    have = flats["fp32"][0].numel()
    if offset != have:
        raise ConsolidateError(f"{_optim_file(ckpt, 0, tp)}: param_shapes account for {offset} elements per rank, "
                               f"the flat fp32 partition holds {have}")
    return out.pop("fp32"), out, info


# ---------------------------------------------------------------- the whole checkpoint
def read_checkpoint(ckpt: str | Path, with_optimizer: bool = True, tp_plan: dict[str, str] | None = None
                    ) -> FullState:
    """Full-size fp32 weights (and Adam moments) of a native DeepSpeed checkpoint of any layout."""

    ckpt = Path(ckpt)
    zero3, files = model_files(ckpt)
    per_tp = []
    first: dict = {}
    for tp, f in sorted(files.items()):
        meta = load_legacy(f)
        ds_cfg = _get(meta, "ds_config", f)
        stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        dp = int(_get(meta, "dp_world_size", f))
        if stage == 0:
            per_tp.append(_rank_zero0(meta, f, with_optimizer))
        elif stage in (1, 2):
            per_tp.append(_rank_zero12(ckpt, meta, f, tp, dp, with_optimizer))
        elif zero3:
            per_tp.append(_rank_zero3(ckpt, meta, f, tp, dp, with_optimizer))
        else:
            raise ConsolidateError(f"{f}: ds_config says ZeRO stage {stage}, but the files are not ZeRO-3 files")
        if tp == 0:
            first = {"meta": meta, "stage": stage, "dp": dp, "bf16": bool(ds_cfg.get("bf16", {}).get("enabled"))}
    weights = merge_tensor_parallel([r[0] for r in per_tp], tp_plan, ckpt)
    moments = {k: merge_tensor_parallel([r[1][k] for r in per_tp], tp_plan, ckpt) for k in per_tp[0][1]}
    meta, info = first["meta"], per_tp[0][2]
    optimizer = {**info, "lr_scheduler": meta.get("lr_scheduler"),
                 **{k: meta.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}}
    source = {"zero_stage": first["stage"], "tp": len(files), "dp": first["dp"], "bf16": first["bf16"]}
    return FullState(weights, moments, optimizer, source)


class HashingCheckpointEngine:
    """DeepSpeed's TorchCheckpointEngine with every saved file hashed while written and fsynced;
    `written` maps each path this rank saved to its manifest entry. Everything else is delegated."""

    def __init__(self, inner):
        self.inner = inner
        self.written: dict[str, dict[str, Any]] = {}

    def save(self, state_dict, path: str) -> None:
        writer = HashingWriter(path)
        try:
            torch.save(state_dict, writer,
                       _use_new_zipfile_serialization=getattr(self.inner, "zipfile_serialization", True))
        finally:
            info = writer.close()
        self.written[os.path.abspath(path)] = info

    def load(self, path: str, map_location=None):
        """torch.load with mmap: tensor data is copied once, from the page cache into DeepSpeed's
        buffers, instead of being read into fresh storages first (halves DeepSpeed's load time here).
        Only called for checkpoints the manager has verified. On CPU, tensors DeepSpeed keeps as they
        come (e.g. the Adam state) stay copy-on-write mappings of the file, so a pruned checkpoint's
        disk space is released when the process ends, not at the prune."""
        try:
            return load_legacy(path, map_location=map_location)
        except CheckpointError:  # refused: nothing else to try
            raise
        except RuntimeError:  # not the zip format (mmap needs it)
            return load_legacy(path, map_location=map_location, mmap=False)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def install(engine) -> HashingCheckpointEngine | None:
    """Wrap `engine.checkpoint_engine` when it is DeepSpeed's plain torch one (others are left alone,
    and the manager hashes their files after the fact)."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, HashingCheckpointEngine):
        return current
    if type(current).__name__ != "TorchCheckpointEngine":
        return None
    engine.checkpoint_engine = HashingCheckpointEngine(current)
    return engine.checkpoint_engine
