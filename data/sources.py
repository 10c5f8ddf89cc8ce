"""The trainer's data sources, behind one protocol (`DataSource`).

The trainer asks a source for this data-parallel rank's share of global step
`step`, micro step `micro`, and gets a `Batch` plus the global index of every
row (the seed of its noise, data/batch.py). Two sources exist:

  LatentSource     the streaming latent loader (data/loader.py) over precomputed
                   shards; its cursor is its state, restored from checkpoints.
  SyntheticSource  moving-square latents (data/synthetic/latents.py), a pure
                   function of (seed, global row index): no state but the step.

`make_source` picks one from `train.data`.
"""
from __future__ import annotations

from typing import Protocol

import torch

from data.batch import Batch
from data.loader import LatentLoader
from data.shard_format import get_fs, read_index
from data.stage import clip_sizes, sample_rng, uniform_int
from data.synthetic.latents import moving_square_latents
from jobconfig.job import JobConfig


class DataSource(Protocol):
    rows_per_micro: int  # batch rows per rank per micro step

    def batch(self, step: int, micro: int = 0) -> tuple[Batch, list[int]]:
        """This rank's rows of (step, micro) and their global row indices ([] for a 0-row batch)."""

    def placeholder(self) -> Batch:
        """A one-frame batch for a zero-weight step (every sample of this rank's share was skipped)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SyntheticSource:
    """Batches of moving-square videos as a pure function of (seed, global row index).

    Global step s, micro step m: rows [base, base + rows_per_micro * dp_size) with
    base = (s * accum + m) * rows_per_micro * dp_size; data-parallel rank r takes
    its contiguous block. The same global rows come out whatever the world size,
    so there is no loader state to restore beyond the step itself. A row's video
    and clip partition come from the stage sampler's RNG (data/stage.py), seeded
    by (seed, global row index).
    """

    def __init__(self, cfg: JobConfig, dp_rank: int, dp_size: int):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.rows_per_micro = cfg.train.batch_size
        self.videos = moving_square_latents(cfg.synthetic, cfg.model.latent_channels, seed=cfg.train.seed)

    def global_rows(self, step: int, micro: int) -> list[int]:
        b = self.rows_per_micro
        base = (step * self.cfg.train.grad_accum_steps + micro) * b * self.dp_size + self.dp_rank * b
        return list(range(base, base + b))

    def sample(self, global_row: int) -> tuple[int, tuple[int, ...]]:
        rng = sample_rng(self.cfg.train.seed, 0, global_row)
        video = uniform_int(rng, 0, self.videos.shape[0] - 1)
        return video, clip_sizes(self.cfg.synthetic.clip_policy, self.videos.shape[1], rng)

    def batch(self, step: int, micro: int = 0) -> tuple[Batch, list[int]]:
        rows = self.global_rows(step, micro)
        picks = [self.sample(r) for r in rows]
        return (Batch(self.videos[[v for v, _ in picks]], [[list(c)] for _, c in picks],
                      keys=[[f"synthetic-{v}"] for v, _ in picks], frame_interval=[[1] for _ in picks]), rows)

    def placeholder(self) -> Batch:
        return Batch(torch.zeros(1, 1, *self.videos.shape[2:]), [[[1]]])

    def state_dict(self) -> dict:
        return {"kind": "synthetic"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic":
            raise ValueError(f"loader state of kind {state.get('kind')!r} cannot resume a synthetic source")


class LatentSource:
    """The streaming latent loader (data/loader.py) as the trainer's data source."""

    def __init__(self, cfg: JobConfig, dp_rank: int, dp_size: int):
        self.loader = LatentLoader(cfg.data, rank=dp_rank, world_size=dp_size)
        self.rows_per_micro = self.loader.max_batch_size  # shape buckets may differ: the largest
        self._it = None
        index = read_index(*get_fs(cfg.data.root, cfg.data.storage_options))
        p = cfg.model.patch_size
        # shape of a zero-weight placeholder row, until a real batch has shown the latent size
        self._shape = tuple(index.get("latent_shape") or (cfg.model.latent_channels, 2 * p, 2 * p))

    def batch(self, step: int, micro: int = 0) -> tuple[Batch, list[int]]:
        # the loader's cursor, not `step`, says where we are: it is restored from the checkpoint
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
