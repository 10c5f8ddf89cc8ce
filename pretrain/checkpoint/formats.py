"""The checkpoint formats, one name each, and `open_checkpoint`: the reader for any checkpoint directory.

    Format.SHARDED    ours (sharded.py): each rank's ZeRO partition in safetensors, engine.json;
                      loads natively only into the layout that wrote it
    Format.PORTABLE   full tensors by name (portable.py): loads into any layout; what a resume on
                      another layout and `vgpt ckpt reshard` convert to
    Format.LEGACY_PT  DeepSpeed's .pt files, which earlier versions wrote (deepspeed_files.py,
                      weights-only reads); layout-bound like SHARDED

Each value is what trainer_state.json records as `layout.format` ("deepspeed"
for the .pt files, the name earlier versions wrote). A directory's format is
told by its files (engine.json, optimizer.json, or neither), so reading one
never depends on its trainer state.

Why: the manager's resume, its conversion on a layout change and `vgpt ckpt
inspect/export/reshard` all need "which format is this, and read it"; each
asks `open_checkpoint`, which verifies the directory against its manifest once
and returns a reader offering what every format can do: `read_full_state`
(full-size fp32 tensors of the plain model, offline, full_state.py) and
`load_into` (a live engine of a layout the checkpoint fits).
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import torch

from pretrain.checkpoint.deepspeed_files import install, read_checkpoint
from pretrain.checkpoint.full_state import FullState
from pretrain.checkpoint.integrity import CheckpointError
from pretrain.checkpoint.portable import is_portable, load_portable, read_portable
from pretrain.checkpoint.sharded import is_sharded, load_sharded, read_sharded
from pretrain.checkpoint.storage import verify_checkpoint


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
    """The reader for checkpoint directory `ckpt`, after every file is re-hashed against its manifest
    (unless the caller has just done that: `verified`); a missing or corrupt file is refused."""
    ckpt = Path(ckpt)
    if not verified and (problems := verify_checkpoint(ckpt, full=True)):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: " + "; ".join(problems))
    return READERS[format_of(ckpt)](ckpt)
