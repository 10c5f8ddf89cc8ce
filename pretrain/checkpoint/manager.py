"""One checkpoint manager for everything resumable.

Layout under the run's checkpoint root:

    step_00000020/rank-RRRRR.safetensors  each rank's ZeRO partition: fp32 masters, Adam moments (sharded.py)
    step_00000020/model-tpTT.safetensors  the module of each tensor-parallel rank
    step_00000020/engine.json             Adam step, hyper-parameters, LR scheduler, engine counters
    step_00000020/trainer_state.json      stage, step, consumed samples, loader state, config, layout
    step_00000020/rng.safetensors         torch CPU RNG state
    step_00000020/manifest.json           size + CRC-32 per 64 MiB block of every file above, and the
                                          manifest's own sha256; written last: the commit
    latest                     the tag of the newest complete checkpoint, moved after the manifest

Nothing in a checkpoint this version writes is a pickle, and no reader of one
calls torch.load or pickle. Checkpoints of earlier versions (DeepSpeed's .pt
files, layout format "deepspeed") still load, through torch.load with
weights_only=True and an allow-list of DeepSpeed's three types
(deepspeed_files.py). Which format a directory holds, and its reader, comes
from one place: formats.open_checkpoint.

A save stalls training only while each rank copies its state into host memory
(`sharded.capture`); with `background=True` a thread then writes the files
(checksummed while written, fsynced), gathers the ranks' manifest entries on
a gloo group of its own, and on rank 0 writes the manifest and moves
`latest`. At most one save is in flight (the next save, `wait()` and the end
of training wait for it). A checkpoint is complete when its manifest exists
and every file matches it, so a save killed at any point never becomes the
one `--resume auto` picks. Loading refuses a checkpoint with a missing or
corrupt file, names it, and falls back to the next older complete one,
loudly; ranks split the re-hashing before a resume (integrity.py).

Every checkpoint records the parallel layout that wrote it (`layout` in
trainer_state.json). A checkpoint loads natively only into the same tensor-
parallel size, ZeRO data-parallel size (dp x sp), ZeRO stage and precision;
when any of these differs, `load` says so loudly and every rank reads, at
once, only the byte ranges of the saved fragments its new partition holds
(fragment_reader.py, resharded_load.py): no conversion, nothing written, no
full copy of the model in any process. DeepSpeed's older .pt checkpoints are
still converted on rank 0 into the portable form (reshard.py) and loaded from
that. `vgpt ckpt reshard` writes the portable form offline.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from pretrain.checkpoint.deepspeed_files import install
from pretrain.checkpoint.formats import Format, describe, layout_of, open_checkpoint
from pretrain.checkpoint.fragment_reader import SavedFragments
from pretrain.checkpoint.integrity import CheckpointError, RefusedFile, atomic_write, write_manifest
from pretrain.checkpoint.reshard import make_portable
from pretrain.checkpoint.resharded_load import load_resharded
from pretrain.checkpoint.safetensors_stream import write_safetensors
from pretrain.checkpoint.sharded import HostBuffers, capture, write_captured
from pretrain.checkpoint.storage import (
    LATEST,
    RNG_FILE,
    TRAINER_STATE,
    CheckpointStore,
    read_trainer_state,
    tag_for,
    verify_checkpoint,
)


def write_latest(root: Path, tag: str) -> None:
    """Point `root/latest` at `tag`; moved only after the checkpoint's manifest exists."""
    atomic_write(Path(root) / LATEST, tag)


# ---------------------------------------------------------------- layouts
def layout_change(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What keeps DeepSpeed from loading `saved` natively into `current` ([] = nothing)."""
    diff = [f"{k} {saved.get(k)} -> {current.get(k)}" for k in ("tp", "zero_stage", "precision")
            if saved.get(k) != current.get(k)]
    # ZeRO partitions over data parallel x sequence parallel (the gradient group)
    dp_saved, dp_now = saved.get("dp", 1) * saved.get("sp", 1), current.get("dp", 1) * current.get("sp", 1)
    if dp_saved != dp_now:
        diff.append(f"ZeRO partitions (dp x sp) {dp_saved} -> {dp_now}")
    return diff


def _trainer_state(ckpt: Path) -> dict[str, Any]:
    """What a resume or a conversion reads of trainer_state.json, refused unless it is all there."""
    return read_trainer_state(ckpt, resumable=True)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj, group=None) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


class CheckpointManager:
    def __init__(self, root: str | Path, rank: int = 0, keep_last: int = 3, keep_every: int = 0,
                 before_commit: Callable[[int], None] | None = None, write_format: Format = Format.SHARDED):
        """`before_commit(step)`: called on rank 0 once a save's files are on disk and its manifest
        is not yet written (fault injection, orchestration/faults.py). `write_format`: Format.SHARDED
        (ours, no pickle) or Format.LEGACY_PT (DeepSpeed's own .pt files: only to compare with, and to
        test reading checkpoints of earlier versions)."""
        if write_format not in (Format.SHARDED, Format.LEGACY_PT):
            raise ValueError(f"write_format: {write_format!r}, expected {Format.SHARDED.value!r} or "
                             f"{Format.LEGACY_PT.value!r}")
        self.root = Path(root)
        self.store = CheckpointStore(self.root)
        self.before_commit = before_commit
        self.rank = rank
        self.keep_last, self.keep_every = keep_last, keep_every
        self.left_broken: dict[str, list[str]] = {}  # of the last prune: broken checkpoints it left in place
        self.write_format = Format(write_format)
        self.on_write: Callable[[int], None] | None = None  # after each write of a save (fault injection)
        self.on_read: Callable[[int], None] | None = None  # after each read of a resharded load (fault injection)
        self._pruner = None  # the thread deleting pruned checkpoints, if any
        self._saving: threading.Thread | None = None  # the background save in flight, if any
        self._save_error: BaseException | None = None
        self._buffers = HostBuffers()
        # the background commit gathers the ranks' manifest entries on a group of its own, so that it
        # never interleaves with the training loop's collectives on the default group
        world = _world()[1]
        self._group = dist.new_group(backend="gloo") if world > 1 else None

    # ------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict[str, Any], barrier=None, model=None,
             tp_rank: int = 0, background: bool = False) -> Path:
        """Collective: every rank calls it. Rank 0 writes the manifest and moves `latest`, last.

        The training loop waits only for the copy of this rank's state into host memory; with
        `background` the files are then written, checksummed, fsynced and committed by a thread
        while training goes on. At most one save is in flight: a save first waits for the previous
        one (and raises its error), as does `wait()`, which the end of training calls."""
        self.wait()
        tag = tag_for(step)
        ckpt = self.root / tag
        if self.rank == 0:
            if ckpt.exists():
                shutil.rmtree(ckpt)  # an incomplete leftover of a killed save of this same step
            ckpt.mkdir(parents=True)
        if barrier:
            barrier()
        layout = {**trainer_state.get("layout", {}), "format": self.write_format}
        # serialised now: the loader and the trainer go on changing what their state dicts refer to
        state = json.dumps({**trainer_state, "step": step, "layout": layout}, indent=1)
        if self.write_format == Format.LEGACY_PT:
            self._commit(ckpt, step, state, torch.get_rng_state(), self._write_legacy(engine, ckpt))
            return ckpt
        captured = capture(engine, model, layout, self.rank, tp_rank, self._buffers)
        if torch.cuda.is_available() and any(t.is_pinned() for t in self._buffers.buffers.values()):
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        rng = torch.get_rng_state()

        def job():
            self._commit(ckpt, step, state, rng, lambda: write_captured(captured, ckpt, on_write=self.on_write))
        if not background:
            job()
            return ckpt

        def run():
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait()
                self._save_error = e
        # not a daemon: the interpreter waits for it at exit rather than leaving a save half-written
        self._saving = threading.Thread(target=run, name=f"ckpt-save-{tag}")
        self._saving.start()
        return ckpt

    def _write_legacy(self, engine, ckpt: Path) -> Callable[[], dict[str, dict]]:
        hashing = install(engine)  # this rank's shards: hashed while written, fsynced
        if hashing:
            hashing.written.clear()
        engine.save_checkpoint(str(self.root), tag=ckpt.name, save_latest=False)
        mine = {}
        for path, info in (hashing.written if hashing else {}).items():
            if Path(path).resolve().parent == ckpt.resolve():
                mine[Path(path).name] = info
        return lambda: mine

    def _commit(self, ckpt: Path, step: int, state: str, rng: torch.Tensor,
                write: Callable[[], dict[str, dict]]) -> None:
        """Write this rank's files, then on rank 0 (once every rank's files are on disk) the manifest
        and `latest`. Runs in the save thread for a background save."""
        mine = write()
        if self.rank == 0:
            mine[RNG_FILE] = write_safetensors(ckpt / RNG_FILE, {"cpu": rng}, on_write=self.on_write)
            atomic_write(ckpt / TRAINER_STATE, state)
        # every rank's files are on disk before the manifest vouches for them: the gather is the barrier
        known = {k: v for entries in _all_gather(mine, self._group) for k, v in entries.items()}
        if self.rank == 0:
            if self.before_commit:
                self.before_commit(step)
            write_manifest(ckpt, step, known)
            write_latest(self.root, ckpt.name)
            self.prune(background=threading.current_thread() is threading.main_thread())
        _all_gather(None, self._group)  # no rank runs ahead of the commit

    def wait(self) -> None:
        """Until the save in flight is committed (raising its error) and pruned checkpoints are deleted."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._save_error is not None:
            error, self._save_error = self._save_error, None
            raise CheckpointError(f"background checkpoint save failed: {type(error).__name__}: {error}") from error
        self._wait_pruner()

    def close(self) -> None:
        """Wait for the save in flight; release the commit group."""
        try:
            self.wait()
        finally:
            if self._group is not None and dist.is_initialized():
                dist.destroy_process_group(self._group)
            self._group = None

    # ------------------------------------------------------------ find / load
    def tags(self) -> list[str]:
        return self.store.tags()

    def problems(self, ckpt: Path, full: bool = True, collective: bool = False) -> list[str]:
        """Verification of one checkpoint, with the files split over the ranks when `collective`
        (every rank must call)."""
        if not collective or _world()[1] == 1:
            return verify_checkpoint(ckpt, full=full)
        found = _all_gather(verify_checkpoint(ckpt, full=full, share=_world()))
        return sorted({p for rank_problems in found for p in rank_problems})

    def load(self, engine, ckpt: Path, model=None, layout: dict[str, Any] | None = None, tp_rank: int = 0,
             tp_size: int = 1, log=print) -> dict[str, Any]:
        """Restore engine and RNG from a verified checkpoint; return the trainer state. Collective.

        With `layout` (this run's) and `model` (the plain model the engine
        wraps), a checkpoint from another layout is re-partitioned as it is read
        (every rank its own part) instead of failing inside DeepSpeed.
        """
        state = _trainer_state(ckpt)
        saved = layout_of(state)
        diff = layout_change(saved, layout) if layout is not None else []
        reader = open_checkpoint(ckpt, verified=True)
        if reader.format == Format.PORTABLE:
            log(f"loading portable checkpoint {ckpt} (source {describe(saved.get('source', {}))}) "
                f"into {describe(layout or {})}")
        if reader.format == Format.PORTABLE or not diff:  # the other formats load only into their own layout
            reader.load_into(engine, model, self.rank, tp_rank, tp_size)
        elif reader.format == Format.SHARDED:
            self._announce(ckpt, saved, layout, diff, "Re-partitioning weights and optimizer state for this "
                           "layout: every rank reads its part of the saved fragments.", log)
            fragments = SavedFragments(ckpt, on_read=self.on_read)
            try:
                load_resharded(engine, model, fragments, tp_rank, tp_size)
            finally:
                fragments.close()
        else:  # DeepSpeed's .pt files: their partitions are pickles, read whole, converted on rank 0
            self._announce(ckpt, saved, layout, diff, "Converting it to the portable form and re-partitioning "
                           "weights and optimizer state for this layout.", log)
            work = self.root / ".converted" / ckpt.name
            self._on_rank0(lambda: make_portable(ckpt, work, layout, verified=True), f"converting {ckpt}")
            open_checkpoint(work, verified=True).load_into(engine, model, self.rank, tp_rank, tp_size)
            self._on_rank0(lambda: shutil.rmtree(work, ignore_errors=True), f"removing {work}")
        torch.set_rng_state(load_file(str(ckpt / RNG_FILE))["cpu"])
        return state

    @staticmethod
    def _announce(ckpt: Path, saved: dict, layout: dict, diff: list[str], how: str, log) -> None:
        msg = (f"PARALLEL LAYOUT CHANGED: checkpoint {ckpt} was written by {describe(saved)}; this run is "
               f"{describe(layout)} ({'; '.join(diff)}). {how}")
        warnings.warn(msg, stacklevel=3)
        log(msg)

    def _on_rank0(self, fn, what: str) -> None:
        """Run `fn` on rank 0 while the others wait; an error on rank 0 is raised on every rank."""
        error, refused = None, False
        if self.rank == 0:
            try:
                fn()
            except RefusedFile as e:  # a file no retry will change: its one line says it all
                error, refused = str(e), True
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                traceback.print_exc()
                error = f"{type(e).__name__}: {e}"
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error, refused]
            dist.broadcast_object_list(box, src=0)
            error, refused = box
        if error:
            raise (RefusedFile if refused else CheckpointError)(f"{what} on rank 0 failed: {error}")

    # ------------------------------------------------------------ retention
    def prune(self, background: bool = False, full: bool = False) -> list[str]:
        """Keep the newest `keep_last` checkpoints that verify and every `keep_every`-th step.

        Only checkpoints that verify count towards the ones kept, or are removed: a broken one is left
        for a person to look at, so the newest checkpoint that verifies is never removed. At a save
        (the trainer) they verify by their sizes: the newest is the one just written and hashed. `full`
        (`vgpt ckpt prune`, on a folder whose files may have changed since) re-hashes every file, so
        that a bit-flipped checkpoint neither counts as one of the `keep_last` nor pushes a good one out.
        Pruned checkpoints are renamed out of sight at once and deleted after; with
        `background` (at a save) in a thread, since unlinking GBs is part of the training stall."""
        self.left_broken = {}
        if self.keep_last <= 0:
            return []
        found = {t: self.store.verify(t, full=False) for t in self.tags()}
        if full:
            found = {t: problems or self.store.verify(t, full=True) for t, problems in found.items()}
        complete = [t for t, problems in found.items() if not problems]
        self.left_broken = {t: problems for t, problems in found.items() if problems}  # tag -> its problems
        keep = set(complete[-self.keep_last:])
        if self.keep_every:
            keep |= {t for t in complete if int(t.split("_")[1]) % self.keep_every == 0}
        removed = [t for t in complete if t not in keep]
        self._wait_pruner()
        for t in removed:
            trash = self.root / f".trash-{t}"
            shutil.rmtree(trash, ignore_errors=True)  # a leftover of an earlier process
            os.replace(self.root / t, trash)
        if background:
            # not a daemon: the interpreter waits for it at exit rather than leaving half a directory
            self._pruner = threading.Thread(target=self._empty_trash, name="ckpt-prune")
            self._pruner.start()
        else:
            self._empty_trash()
        return removed

    def _wait_pruner(self) -> None:
        """Until the background deletion of pruned checkpoints has finished."""
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def _empty_trash(self) -> None:
        for trash in self.root.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
