"""`vgpt ckpt reshard`: a checkpoint's offline copy in the portable form, written one parameter at a time.

What: `make_portable(src, dst, layout)` writes checkpoint `src` (any format)
as a portable checkpoint directory `dst` (portable.py: full, TP-merged fp32
weights and Adam moments by name, optimizer.json, the trainer state with the
target layout recorded, its manifest) that a run of any layout resumes from.
A sharded checkpoint, on a local disk or an object store, is read through
fragment_reader.py, the reader a resume on another layout uses: each
parameter is put together from the byte ranges of its saved fragments (and TP
shards) and streamed into the output file, so no process holds more than one
parameter. DeepSpeed's older .pt checkpoints keep the converting path of
deepspeed_files.py (their pickled partitions are read whole); a portable one
is copied.

Why still a portable copy: it is what a person moves to another cluster or
hands to a tool that knows nothing of ZeRO partitions, and checkpoints that
already exist in that form stay readable. A resume does not need one any more
(manager.py reads a sharded checkpoint into any layout directly).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from jobconfig.secrets import redact
from parallel.tensor_parallel import plan_style
from pretrain.checkpoint.export import EXPORT_FORMAT
from pretrain.checkpoint.formats import READERS, Format, check_model_fit, layout_of, open_checkpoint
from pretrain.checkpoint.fragment_reader import SavedFragments
from pretrain.checkpoint.full_state import MOMENTS
from pretrain.checkpoint.integrity import MANIFEST, atomic_write, write_manifest
from pretrain.checkpoint.portable import FORMAT, OPTIMIZER, WEIGHTS, write_portable
from pretrain.checkpoint.safetensors_stream import write_safetensors_lazy
from pretrain.checkpoint.storage import RNG_FILE, TRAINER_STATE, read_trainer_state


def make_portable(src: Path, dst: Path, layout: dict[str, Any] | None = None, verified: bool = False) -> Path:
    """Convert local checkpoint `src` (any format) into a portable checkpoint directory `dst`, with its
    own trainer state (layout marked portable, `layout` recorded as the intended target) and manifest."""
    state = read_trainer_state(src, resumable=True)
    reader = open_checkpoint(src, verified=verified)
    if reader.format == Format.SHARDED:
        saved = SavedFragments(src)
        try:
            return write_resharded(saved, state, (src / RNG_FILE).read_bytes(), dst, layout)
        finally:
            saved.close()
    saved_layout = layout_of(state)
    tmp = _fresh(dst)
    if reader.format == Format.PORTABLE:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / MANIFEST).unlink()
        source = saved_layout.get("source", saved_layout)
    else:  # DeepSpeed's .pt files: their partitions are pickles, read whole (deepspeed_files.py)
        tp_plan = saved_layout.get("tp_plan") or (layout or {}).get("tp_plan")
        full = reader.read_full_state(with_optimizer=True, tp_plan=tp_plan)
        write_portable(full, tmp, from_dict(ModelConfig, state["config"]["model"], "model"))
        shutil.copy2(src / RNG_FILE, tmp / RNG_FILE)
        source = saved_layout
    return _commit(tmp, dst, state, source, layout)


def write_resharded(saved: SavedFragments, state: dict[str, Any], rng: bytes, dst: Path,
                    layout: dict[str, Any] | None = None) -> Path:
    """The portable form of sharded checkpoint `saved` (local or on an object store; `state`, `rng`: its
    trainer state and RNG file) in local directory `dst`, one parameter in memory at a time."""
    tmp = _fresh(dst)
    model_cfg = from_dict(ModelConfig, state["config"]["model"], "model")
    names = saved.names()
    shapes = {n: _merged_shape(saved, n) for n in names}
    module_path, module = saved.modules.get(0, ("", {}))
    buffers = {n: dims for n, (_, dims, _) in module.items() if n not in shapes}  # the rest: parameters
    weights = {**{n: (torch.float32, s) for n, s in shapes.items()},
               **{n: (torch.float32, d) for n, d in buffers.items()}}

    def weight(name: str) -> torch.Tensor:
        return saved.parameter(name, "fp32") if name in shapes else saved.buffer(name).float()
    meta = {"model_config": json.dumps(asdict(model_cfg)), "format": EXPORT_FORMAT,
            "format_note": json.dumps(FORMAT)}  # as export.save_export writes a single file: a valid export
    # checksummed while written: the manifest needs no second read of them
    hashed = {WEIGHTS: write_safetensors_lazy(tmp / WEIGHTS, weights, weight, redact(meta))}
    for kind in MOMENTS:
        hashed[f"{kind}.safetensors"] = write_safetensors_lazy(
            tmp / f"{kind}.safetensors", {n: (torch.float32, s) for n, s in shapes.items()},
            lambda name, kind=kind: saved.parameter(name, kind))
    info = {"format": FORMAT, "optimizer": saved.engine["optimizer"], "source": saved.engine.get("source", {})}
    (tmp / OPTIMIZER).write_text(json.dumps(info, indent=1))
    (tmp / RNG_FILE).write_bytes(rng)
    return _commit(tmp, dst, state, saved.layout or saved.engine.get("layout", {}), layout, hashed)


def _merged_shape(saved: SavedFragments, name: str) -> list[int]:
    """The shape of parameter `name` with its TP shards put back together (saved.parameter's result)."""
    shape = list(saved.shapes[(0, name)])
    style = plan_style(name.rpartition(".")[0], saved.layout.get("tp_plan") or {}) if saved.tp > 1 else None
    if style is None:
        return shape
    if style == "row":
        return shape if len(shape) == 1 else [*shape[:-1], shape[-1] * saved.tp]
    return [shape[0] * saved.tp, *shape[1:]]


def _fresh(dst: Path) -> Path:
    tmp = dst.with_name(f".{dst.name}.tmp")  # not a `step_*` name: never listed as a checkpoint
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, dst: Path, state: dict[str, Any], source: dict[str, Any],
            layout: dict[str, Any] | None, hashed: dict[str, dict] | None = None) -> Path:
    """The trainer state (layout: portable, from `source`, for `layout`) and manifest (`hashed`: entries of
    files checksummed while written), checked against the model, then `tmp` renamed into `dst`."""
    state = dict(state)
    state["layout"] = {"format": Format.PORTABLE, "source": source,
                       **{k: v for k, v in (layout or {}).items() if k not in ("format", "source")}}
    atomic_write(tmp / TRAINER_STATE, json.dumps(state, indent=1))
    check_model_fit(READERS[Format.PORTABLE](tmp))  # headers only: a copy that fits the files, not the model
    write_manifest(tmp, int(state["step"]), hashed)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst

