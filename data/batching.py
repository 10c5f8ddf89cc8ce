"""Samples of one rank's step -> a `data.batch.Batch` (with padding and packing).

Without packing (`pack_tokens` = 0) every sample is one row. With packing,
samples are laid into rows in their order, greedily: a sample joins the
current row while the row's tokens (data.batch.sequence_length) stay within
`pack_tokens`, else it opens a new row; a sample longer than the budget gets a
row of its own. Samples of one row are separate entries of the row's `clips`,
so the clip attention keeps them apart (clips of different samples never see
each other). Rows shorter than the longest are padded with zero frames, which
`Batch.frame_mask()` marks as padding.

A step's samples are of one shape bucket (data/buckets.py), so the rows of a
batch, packed or not, hold latents of one shape.

`LatentBatch` is a `Batch` plus provenance: the global index (epoch * N + p)
of every sample (feed it to `pretrain.training.objective.row_seed` so the noise does not
depend on the run's parallel layout), its stored frame indices, and the positions of
this step that were skipped with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data.batch import Batch, sequence_length
from jobconfig.errors import ConfigError


@dataclass
class SampleRecord:
    """What a reader yields for one position of the global stream (a sample or a skip)."""
    global_index: int              # epoch * num_samples + position
    epoch: int
    position: int
    shard: str
    key: str | None = None
    skip: str | None = None        # why skipped: too_short, too_many_tokens, corrupt_shard, corrupt_sample
    latents: torch.Tensor | None = None  # [F, C, h, w] in the stored dtype (collate converts)
    frame_indices: tuple[int, ...] = ()
    interval: int = 0
    clips: tuple[int, ...] = ()
    patches: int = 0               # tokens per frame
    step: int = 0                  # the global step (since the loader's start) that serves it


@dataclass
class LatentBatch(Batch):
    global_index: list[list[int]] = field(default_factory=list)         # per row, per sample
    frame_indices: list[list[tuple[int, ...]]] = field(default_factory=list)
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)  # (global index, key, reason)

    def to(self, device) -> "LatentBatch":
        return LatentBatch(self.latents.to(device), self.clips, self.keys, self.frame_interval,
                           self.global_index, self.frame_indices, self.skipped, moments=self.moments)

    @property
    def row_index(self) -> list[int]:
        """One stable id per row (its first sample's global index): the objective's row seed source."""
        return [row[0] for row in self.global_index]

    def samples(self) -> list[tuple[int, str, tuple[int, ...], tuple[int, ...], int]]:
        """(global index, key, frame indices, clips, interval) of every sample, in order."""
        out = []
        for r, row in enumerate(self.clips):
            for s, clips in enumerate(row):
                out.append((self.global_index[r][s], self.keys[r][s], self.frame_indices[r][s],
                            tuple(clips), self.frame_interval[r][s]))
        return out


def pack_rows(tokens: list[int], budget: int) -> list[list[int]]:
    """Greedy in-order packing of sample token counts into rows of at most `budget` (0: one per row)."""
    rows: list[list[int]] = []
    used = 0
    for i, t in enumerate(tokens):
        if budget and rows and used + t <= budget:
            rows[-1].append(i)
            used += t
        else:
            rows.append([i])
            used = t
    return rows


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of `t` as same-size integers (numpy has no bfloat16)."""
    return t.view(_SAME_SIZE_INT[t.element_size()]).numpy()


def copy_serial(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (with the dtype conversion the loader needs) through numpy, i.e. without
    torch's intra-op thread pool: these copies are memory-bound, and on a busy host the pool's
    threads wait on each other (measured: collate 10x slower with 2 threads than with 1 on this
    2-core machine under load)."""
    if src.dtype == dst.dtype:
        numpy_view(dst)[...] = numpy_view(src)
    elif src.dtype == torch.bfloat16 and dst.dtype == torch.float32:
        # a bfloat16 is the top half of a float32
        numpy_view(dst)[...] = numpy_view(src).astype(np.int32) << 16
    elif src.dtype in _NUMPY_FLOATS and dst.dtype in _NUMPY_FLOATS:
        dst.numpy()[...] = src.numpy()
    else:
        dst.copy_(src)


def collate(records: list[SampleRecord], pack_tokens: int, dtype: torch.dtype, moments: bool = False) -> LatentBatch:
    """`moments`: the records hold posterior moments (a `posterior`-form dataset); the batch says so."""
    ok = [r for r in records if r.skip is None]
    skipped = [(r.global_index, r.key, r.skip) for r in records if r.skip is not None]
    if not ok:  # every position of this rank's step was skipped: a 0-row batch, the step still counts
        return LatentBatch(torch.zeros(0, 0, 0, 0, 0, dtype=dtype), [], [], [], [], [], skipped, moments=moments)
    shapes = {tuple(r.latents.shape[1:]) for r in ok}
    if len(shapes) > 1:
        raise ConfigError(f"data.batch_size/pack_tokens: one step holds latents of shapes {sorted(shapes)} "
                          f"(keys {[r.key for r in ok]}), but its index.json records no per-sample shapes "
                          "(written before they were recorded), so the loader cannot group samples by shape: "
                          "rebuild the index with the precompute job, or use batch_size 1 without packing")
    tokens = [sequence_length([list(r.clips)], r.patches) for r in ok]
    rows = pack_rows(tokens, pack_tokens)
    frames = [sum(ok[i].latents.shape[0] for i in row) for row in rows]
    latents = torch.empty(len(rows), max(frames), *shapes.pop(), dtype=dtype)
    clips, keys, intervals, gidx, fidx = [], [], [], [], []
    for r, row in enumerate(rows):
        f0 = 0
        for i in row:
            x = ok[i].latents
            copy_serial(latents[r, f0:f0 + x.shape[0]], x)
            f0 += x.shape[0]
        numpy_view(latents[r, f0:])[...] = 0  # padding frames
        clips.append([list(ok[i].clips) for i in row])
        keys.append([ok[i].key for i in row])
        intervals.append([ok[i].interval for i in row])
        gidx.append([ok[i].global_index for i in row])
        fidx.append([ok[i].frame_indices for i in row])
    return LatentBatch(latents, clips, keys, intervals, gidx, fidx, skipped, moments=moments)
