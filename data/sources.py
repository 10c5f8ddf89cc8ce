"""The trainer's data sources, behind one protocol (`DataSource`).

The trainer asks a source for this data-parallel rank's next micro batch
(`next_batch`), and gets a `Batch` plus the global index of every row (the
seed of its noise, data/batch.py). A source is a cursor: where it stands is
its state (`state_dict`), saved with every checkpoint and restored on resume,
so the trainer never tells it which step it is at. Two sources exist:

  LatentSource     the streaming latent loader (data/loader.py) over precomputed
                   shards, one per dataset of data.sources blended step by step
                   (data/blend.py; data.root is one source); its cursor is the
                   blend's step and each loader's per-bucket cursors.
  SyntheticSource  moving-square latents (data/synthetic/latents.py), a pure
                   function of (seed, global row index); its cursor is the count
                   of micro batches served.

`make_source` picks one from `train.data`. `source_counts` reports the
samples each dataset of a blend served (host integers, no device sync).
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from data.batch import Batch
from data.blend import describe_line, open_blend
from data.stage import clip_sizes, sample_rng, uniform_int
from data.synthetic.latents import moving_square_latents
from jobconfig.job import JobConfig

log = logging.getLogger(__name__)


class DataSource(Protocol):
    rows_per_micro: int  # batch rows per rank per micro step

    def next_batch(self) -> tuple[Batch, list[int]]:
        """This rank's rows of the next micro batch and their global row indices ([] for a 0-row batch)."""

    def placeholder(self) -> Batch:
        """A one-frame batch for a zero-weight step (every sample of this rank's share was skipped)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def source_counts(self) -> dict[str, int]:
        """Samples served per dataset of a blend since the last call, this rank ({}: one dataset)."""


class SyntheticSource:
    """Batches of moving-square videos as a pure function of (seed, global row index).

    Each micro batch takes the next rows_per_micro * dp_size global rows; data-parallel
    rank r takes its contiguous block. The state is the count of global rows served, so
    a resume on another world size or batch size continues with the next rows (with
    the same global batch, the same rows as an uninterrupted run). A row's video and
    clip partition come from the stage sampler's RNG (data/stage.py), seeded by
    (seed, global row index).
    """

    def __init__(self, cfg: JobConfig, dp_rank: int, dp_size: int):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.rows_per_micro = cfg.train.batch_size
        self.videos = moving_square_latents(cfg.synthetic, cfg.model.latent_channels, seed=cfg.train.seed)
        self.rows_served = 0  # global rows of every rank so far: the cursor

    def sample(self, global_row: int) -> tuple[int, tuple[int, ...]]:
        rng = sample_rng(self.cfg.train.seed, 0, global_row)
        video = uniform_int(rng, 0, self.videos.shape[0] - 1)
        return video, clip_sizes(self.cfg.synthetic.clip_policy, self.videos.shape[1], rng)

    def next_batch(self) -> tuple[Batch, list[int]]:
        b = self.rows_per_micro
        base = self.rows_served + self.dp_rank * b
        rows = list(range(base, base + b))
        self.rows_served += b * self.dp_size
        picks = [self.sample(r) for r in rows]
        return (Batch(self.videos[[v for v, _ in picks]], [[list(c)] for _, c in picks],
                      keys=[[f"synthetic-{v}"] for v, _ in picks], frame_interval=[[1] for _ in picks]), rows)

    def placeholder(self) -> Batch:
        return Batch(torch.zeros(1, 1, *self.videos.shape[2:]), [[[1]]])

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "rows_served": self.rows_served}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic":
            raise ValueError(f"loader state of kind {state.get('kind')!r} cannot resume a synthetic source")
        n = state.get("rows_served")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"synthetic source state: rows_served {n!r}, expected a non-negative count "
                             "(a checkpoint of before the source kept its cursor: resume it with --resume fresh)")
        self.rows_served = n

    def source_counts(self) -> dict[str, int]:
        return {}


class LatentSource:
    """The streaming latent loader (data/loader.py) as the trainer's data source: the blend of
    data.sources (data/blend.py), or of data.root alone, which is that one loader batch for batch."""

    def __init__(self, cfg: JobConfig, dp_rank: int, dp_size: int):
        self.blend = open_blend(cfg.data, rank=dp_rank, world_size=dp_size, heldout=cfg.eval.split_fraction)
        self.rows_per_micro = self.blend.max_batch_size  # shape buckets and sources may differ: the largest
        for d in self.blend.describe():
            log.info(describe_line(d))
        # shape of a zero-weight placeholder row, until a real batch has shown the latent size: the first
        # shape bucket's "HxW" (from the index, nothing read), else any size the patch grid takes
        h, _, w = self.blend.loaders[0].buckets.names[0].partition("x")
        p = cfg.model.patch_size
        hw = (int(h), int(w)) if h.isdigit() and w.isdigit() else (2 * p, 2 * p)
        self._shape = (cfg.model.latent_channels, *hw)
        self._reported: dict[str, int] = {}

    @property
    def loader(self):
        """The loader of the first (for data.root, the only) dataset."""
        return self.blend.loaders[0]

    def next_batch(self) -> tuple[Batch, list[int]]:
        try:
            i, b = self.blend.next()
        except StopIteration:
            raise RuntimeError("data: the loader ran out of samples (data.epochs reached) before train.steps; "
                               "raise data.epochs (0 = endless) or lower train.steps") from None
        if b.clips:  # the placeholder is a single-draw batch: the model's channels, this batch's h x w
            self._shape = (self._shape[0], *b.latents.shape[3:])
        return b, self.blend.rows(i, b)

    def placeholder(self) -> Batch:
        return Batch(torch.zeros(1, 1, *self._shape), [[[1]]])

    def state_dict(self) -> dict:
        return {"kind": "latents", **self.blend.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "latents":
            raise ValueError(f"loader state of kind {state.get('kind')!r} cannot resume the latent loader")
        self.blend.load_state_dict({k: v for k, v in state.items() if k != "kind"})

    def source_counts(self) -> dict[str, int]:
        if len(self.blend) == 1:
            return {}
        now = dict(self.blend.drawn)
        out = {name: now.get(name, 0) - self._reported.get(name, 0) for name in self.blend.names}
        self._reported = now
        return out


def make_source(cfg: JobConfig, dp_rank: int, dp_size: int) -> DataSource:
    """The source `train.data` names, for this data-parallel rank."""
    return (SyntheticSource if cfg.train.data == "synthetic" else LatentSource)(cfg, dp_rank, dp_size)
