"""The checkpoint formats, one name each, and `open_checkpoint`: the reader for any checkpoint directory.

    Format.SHARDED    ours (sharded.py): each rank's ZeRO partition in safetensors, engine.json;
                      loads natively only into the layout that wrote it
    Format.PORTABLE   full tensors by name (portable.py): loads into any layout; what `vgpt ckpt
                      reshard` writes, and what a LEGACY_PT checkpoint converts to on a layout change
    Format.LEGACY_PT  DeepSpeed's .pt files, which earlier versions wrote (deepspeed_files.py,
                      weights-only reads); layout-bound like SHARDED

Each value is what trainer_state.json records as `layout.format` ("deepspeed"
for the .pt files, the name earlier versions wrote). A directory's format is
told by its files (engine.json, optimizer.json, or neither), so reading one
never depends on its trainer state.

Why: the manager's resume, its conversion on a layout change and `vgpt ckpt
inspect/export/reshard` all need "which format is this, and read it"; each
asks `open_checkpoint`, which verifies the directory against its manifest once
(checksums, then the files' schemas: storage.py, structure.py), checks its
tensors' shapes against the model its trainer state records (`check_model_fit`:
a tensor that fits the files but not the model is refused before any path reads
or skips it), and returns a reader offering what every format can do: `read_full_state`
(full-size fp32 tensors of the plain model, offline, full_state.py) and
`load_into` (a live engine of a layout the checkpoint fits). A SHARDED
checkpoint resumed on another layout is read by byte ranges instead
(fragment_reader.py, resharded_load.py: no full-size state anywhere).
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from pretrain.checkpoint.deepspeed_files import install, read_checkpoint
from pretrain.checkpoint.full_state import FullState
from pretrain.checkpoint.integrity import CheckpointError
from pretrain.checkpoint.portable import is_portable, load_portable, read_portable
from pretrain.checkpoint.schema import META_KEY, WEIGHTS, Header, refuse, safetensors_header, show
from pretrain.checkpoint.sharded import is_sharded, load_sharded, model_file, rank_file, read_sharded
from pretrain.checkpoint.storage import read_trainer_state, verify_checkpoint
from pretrain.model.videogpt import VideoGPT


class Format(StrEnum):
    LEGACY_PT = "deepspeed"
    SHARDED = "sharded"
    PORTABLE = "portable"


def format_of(ckpt: str | Path) -> Format:
    if is_sharded(ckpt):
        return Format.SHARDED
    if is_portable(ckpt):
        return Format.PORTABLE
    return Format.LEGACY_PT  # its reader names the files it misses when it is none of the three


class CheckpointReader:
    """One checkpoint directory, already verified, in the format of the subclass."""
    format: Format

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt

    def read_full_state(self, with_optimizer: bool = True, tp_plan: dict[str, str] | None = None) -> FullState:
        """Full-size fp32 weights (and Adam moments unless not `with_optimizer`) of the plain model;
        `tp_plan` merges tensor-parallel shards (formats that hold them)."""
        raise NotImplementedError

    def load_into(self, engine, model: torch.nn.Module, rank: int = 0, tp_rank: int = 0, tp_size: int = 1) -> None:
        """Weights, optimizer state, LR scheduler and counters into `engine`, which wraps `model` (the
        plain model after `apply_tensor_parallel`). Collective: every rank calls it."""
        raise NotImplementedError


class ShardedReader(CheckpointReader):
    format = Format.SHARDED

    def read_full_state(self, with_optimizer: bool = True, tp_plan: dict[str, str] | None = None) -> FullState:
        return read_sharded(self.ckpt, with_optimizer, tp_plan)

    def load_into(self, engine, model: torch.nn.Module, rank: int = 0, tp_rank: int = 0, tp_size: int = 1) -> None:
        load_sharded(engine, model, self.ckpt, rank, tp_rank)  # this rank's own file: the same layout only


class PortableReader(CheckpointReader):
    format = Format.PORTABLE

    def read_full_state(self, with_optimizer: bool = True, tp_plan: dict[str, str] | None = None) -> FullState:
        return read_portable(self.ckpt, with_optimizer)  # merged already: no plan needed

    def load_into(self, engine, model: torch.nn.Module, rank: int = 0, tp_rank: int = 0, tp_size: int = 1) -> None:
        load_portable(engine, model, self.ckpt, tp_rank, tp_size)


class LegacyReader(CheckpointReader):
    format = Format.LEGACY_PT

    def read_full_state(self, with_optimizer: bool = True, tp_plan: dict[str, str] | None = None) -> FullState:
        return read_checkpoint(self.ckpt, with_optimizer, tp_plan)

    def load_into(self, engine, model: torch.nn.Module, rank: int = 0, tp_rank: int = 0, tp_size: int = 1) -> None:
        # DeepSpeed's own loader, the same layout only: weights_only loads of allow-listed globals, mmapped
        # (deepspeed_files.HashingCheckpointEngine.load)
        install(engine)
        load_path, _ = engine.load_checkpoint(str(self.ckpt.parent), tag=self.ckpt.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{self.ckpt}: DeepSpeed could not load it")


READERS: dict[Format, type[CheckpointReader]] = {r.format: r for r in (ShardedReader, PortableReader, LegacyReader)}


def open_checkpoint(ckpt: str | Path, verified: bool = False) -> CheckpointReader:
    """The reader for checkpoint directory `ckpt`, after every file is re-hashed against its manifest and
    checked against its schema (unless the caller has just done that: `verified`), and its tensors against
    the model its trainer state names; a missing, corrupt or unfitting file is refused."""
    ckpt = Path(ckpt)
    if not verified and (problems := verify_checkpoint(ckpt, full=True)):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: " + "; ".join(problems))
    reader = READERS[format_of(ckpt)](ckpt)
    check_model_fit(reader)
    return reader


def check_model_fit(reader: CheckpointReader) -> None:
    """The full-size tensors of a sharded (one TP rank) or portable checkpoint against the model that
    trainer_state.json's config.model builds (on the meta device: no memory, milliseconds): none it
    lacks, none of another shape, every parameter there. Headers only; after `verify` (structure.py)."""
    ckpt = reader.ckpt
    state = read_trainer_state(ckpt)
    model = state.get("config", {}).get("model")
    if model is None or reader.format == Format.LEGACY_PT:
        return
    cfg = from_dict(ModelConfig, dict(model), "model")  # validated with the trainer state
    cfg.phi3_checkpoint = None
    with torch.device("meta"):
        built = VideoGPT(cfg)
    known = {k: list(v.shape) for k, v in built.state_dict().items()}
    params = {n for n, _ in built.named_parameters()}
    if reader.format == Format.PORTABLE:
        _against_model(safetensors_header(ckpt / WEIGHTS), known, params)
        return
    # two headers, whatever the world size (every rank opens the checkpoint): rank 0's fragments (ZeRO-3: a
    # piece of every parameter) and TP rank 0's module (ZeRO-0/1/2: every parameter whole); structure.py has
    # checked that the other ranks record the same shapes
    if (ckpt / model_file(1)).is_file():
        return  # tensor-parallel shards: checked against each other only (structure.py)
    info = safetensors_header(ckpt / rank_file(0)).meta_json(META_KEY)
    shapes = {name: frag[2] for name, frag in info["fragments"].items()}
    _against_model(shapes, known, None, where=ckpt / rank_file(0), what="fragments of")
    module = safetensors_header(ckpt / model_file(0)) if (ckpt / model_file(0)).is_file() else None
    if module is not None:
        _against_model(module, known, params=None)
    held = set(shapes) | (set(module.tensors) if module is not None else set())
    _against_model({n: known[n] for n in held}, known, params, where=ckpt, what="tensors of")


def _against_model(tensors, known: dict[str, list[int]], params: set[str] | None, where: Path | None = None,
                   what: str = "tensor") -> None:
    """Tensors (a header, or {name: shape}) against the model's: none it lacks, none of another shape, and
    each of `params` there."""
    if isinstance(tensors, Header):
        where, tensors = tensors.path, {n: dims for n, (_, dims) in tensors.tensors.items()}
    for name, dims in tensors.items():
        if name not in known:
            raise refuse(where, f"{what} {show(name)}", "a tensor of the model that trainer_state.json's "
                                                        "config.model builds (it has none of that name)")
        if list(dims) != known[name]:
            raise refuse(where, f"{what} {show(name)} shape", f"{known[name]}, the model's", dims)
    if params and (missing := sorted(params - set(tensors))):
        raise refuse(where, what.removesuffix(" of") + "s", f"every parameter of the model, but "
                                                              f"{show(missing[0])} has none")


# ---------------------------------------------------------------- layouts
def layout_of(state: dict[str, Any]) -> dict[str, Any]:
    """The layout recorded in a trainer state; derived from its config for older checkpoints."""
    if "layout" in state:
        return state["layout"]
    pc = state.get("config", {}).get("parallel", {})
    ws, tp, sp = state.get("world_size", 1), pc.get("tensor_parallel", 1), pc.get("sequence_parallel", 1)
    return {"format": Format.LEGACY_PT, "world_size": ws, "dp": ws // (tp * sp), "tp": tp, "sp": sp,
            "zero_stage": pc.get("zero_stage", 2), "precision": pc.get("precision", "bf16")}


def describe(layout: dict[str, Any]) -> str:
    keys = ("world_size", "dp", "tp", "sp", "zero_stage", "precision")
    return " ".join(f"{k}={layout[k]}" for k in keys if k in layout)
