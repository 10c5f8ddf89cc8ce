"""The trainer's data sources, behind one protocol (`DataSource`).

The trainer asks a source for this data-parallel rank's next micro batch
(`next_batch`), and gets a `Batch` plus the global index of every row (the
seed of its noise, data/batch.py). A source is a cursor: where it stands is
its state (`state_dict`), saved with every checkpoint and restored on resume,
so the trainer never tells it which step it is at. Two sources exist:

  LatentSource     the streaming latent loader (data/loader.py) over precomputed
                   shards; its cursor is the loader's per-bucket cursors.
  SyntheticSource  moving-square latents (data/synthetic/latents.py), a pure
                   function of (seed, global row index); its cursor is the count
                   of micro batches served.

`make_source` picks one from `train.data`.
"""
from __future__ import annotations

from typing import Protocol

import torch

from data.batch import Batch
from data.loader import LatentLoader
from data.stage import clip_sizes, sample_rng, uniform_int
from data.synthetic.latents import moving_square_latents
from jobconfig.job import JobConfig


class DataSource(Protocol):
    rows_per_micro: int  # batch rows per rank per micro step

    def next_batch(self) -> tuple[Batch, list[int]]:
        """This rank's rows of the next micro batch and their global row indices ([] for a 0-row batch)."""

    def placeholder(self) -> Batch:
        """A one-frame batch for a zero-weight step (every sample of this rank's share was skipped)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


class LatentSource:
    """The streaming latent loader (data/loader.py) as the trainer's data source."""

    def __init__(self, cfg: JobConfig, dp_rank: int, dp_size: int):
        self.loader = LatentLoader(cfg.data, rank=dp_rank, world_size=dp_size)
        self.rows_per_micro = self.loader.max_batch_size  # shape buckets may differ: the largest
        self._it = None
        meta, p = self.loader.meta, cfg.model.patch_size
        # shape of a zero-weight placeholder row, until a real batch has shown the latent size
        self._shape = (tuple(meta.shapes[0, 1:].tolist()) if meta.shapes is not None else meta.latent_shape) \
            or (cfg.model.latent_channels, 2 * p, 2 * p)

    def next_batch(self) -> tuple[Batch, list[int]]:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            b = next(self._it)
        except StopIteration:
            raise RuntimeError("data: the loader ran out of samples (data.epochs reached) before train.steps; "
                               "raise data.epochs (0 = endless) or lower train.steps") from None
        if b.clips:
            self._shape = tuple(b.latents.shape[2:])
        return b, b.row_index

    def placeholder(self) -> Batch:
        return Batch(torch.zeros(1, 1, *self._shape), [[[1]]])

    def state_dict(self) -> dict:
        return {"kind": "latents", **self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "latents":
            raise ValueError(f"loader state of kind {state.get('kind')!r} cannot resume the latent loader")
        self.loader.load_state_dict({k: v for k, v in state.items() if k != "kind"})
        self._it = None


def make_source(cfg: JobConfig, dp_rank: int, dp_size: int) -> DataSource:
    """The source `train.data` names, for this data-parallel rank."""
    return (SyntheticSource if cfg.train.data == "synthetic" else LatentSource)(cfg, dp_rank, dp_size)
