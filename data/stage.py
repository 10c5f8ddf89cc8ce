"""Per-stage sample construction: one stored video -> one training sample.

A stored video has T latent frames. A stage (data.stage, METHOD.md's table)
asks for F frames at a frame interval d, split into clips:

  interval fixed:   d = interval_value; the video needs T >= (F-1)*d + 1
  interval random:  d ~ U{lo .. min(hi, (T-1)//(F-1))}; needs (T-1)//(F-1) >= lo
  start frame:      s ~ U{0 .. T-1-(F-1)*d}; frames s, s+d, ..., s+(F-1)*d
  clips single_frame: F clips of 1 frame (next-frame diffusion, stage 1)
  clips random:     K ~ U{2..F}, K-1 distinct cut points drawn from {1..F-1}

A video that cannot give F frames, or whose sample exceeds `max_tokens`
(data.batch.sequence_length), is not an error: it is skipped with a
reason (data/buckets.py, `plan_or_skip`) and counted by the loader. All draws come from the RNG the caller
passes, seeded by (seed, epoch, global position): never from worker or rank
state, so the same position gives the same sample in every parallel layout.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from data.batch import patches_per_frame, sequence_length
from jobconfig.data import StageSamplingConfig


@dataclass(frozen=True)
class SamplePlan:
    frame_indices: tuple[int, ...]   # stored-frame indices, increasing, spaced by `interval`
    interval: int
    clips: tuple[int, ...]           # clip sizes, summing to len(frame_indices)


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The one RNG of a sample, from (seed, epoch, position in the epoch order).

    A hash of the three numbers seeds a Mersenne Twister: cheap per sample (numpy's
    SeedSequence costs ~0.2 ms, a visible share of the loader's per-sample budget)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=16,
                             person=b"vgpt-stage").digest()
    return random.Random(int.from_bytes(digest, "little"))


def interval_bounds(cfg: StageSamplingConfig, num_frames: int) -> tuple[int, int] | None:
    """[lo, hi] of the allowed frame interval for a video of `num_frames`; None if too short."""
    if num_frames < 1:
        return None
    F = cfg.frames
    d_fit = (num_frames - 1) // (F - 1) if F > 1 else cfg.interval_value + cfg.interval_max  # F=1: any d fits
    if cfg.interval == "fixed":
        return (cfg.interval_value, cfg.interval_value) if d_fit >= cfg.interval_value else None
    hi = min(cfg.interval_max, d_fit)
    return (cfg.interval_min, hi) if hi >= cfg.interval_min else None


def uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform in [lo, hi] from `random()` alone: the one draw Python guarantees stable across
    versions (randint/sample may change), so a checkpoint resumes identically after an upgrade."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def random_partition(frames: int, rng: random.Random) -> tuple[int, ...]:
    """K ~ U{2..F} clips with K-1 distinct random cut points in {1..F-1} (partial Fisher-Yates)."""
    k = uniform_int(rng, 2, frames)
    points = list(range(1, frames))
    for i in range(k - 1):
        j = uniform_int(rng, i, len(points) - 1)
        points[i], points[j] = points[j], points[i]
    bounds = [0, *sorted(points[: k - 1]), frames]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def clip_sizes(policy: str, frames: int, rng: random.Random) -> tuple[int, ...]:
    """The clips of `frames` frames under a clip policy: `single_frame` (one frame per clip, stage 1;
    draws nothing) or `random` (`random_partition`). Stage samples, synthetic rows and the sweep's
    held-out set all cut their clips here."""
    return (1,) * frames if policy == "single_frame" else random_partition(frames, rng)


def plan_sample(cfg: StageSamplingConfig, num_frames: int, rng: random.Random) -> SamplePlan | None:
    """Frames, interval and clips of one sample; None when the video is too short for the stage."""
    bounds = interval_bounds(cfg, num_frames)
    if bounds is None:
        return None
    d = uniform_int(rng, bounds[0], bounds[1])
    span = (cfg.frames - 1) * d
    start = uniform_int(rng, 0, num_frames - 1 - span)
    frames = tuple(range(start, start + span + 1, d))
    return SamplePlan(frames, d, clip_sizes(cfg.clips, cfg.frames, rng))


def sample_tokens(cfg: StageSamplingConfig, clips: tuple[int, ...], latent_hw: tuple[int, int]) -> int:
    return sequence_length([list(clips)], patches_per_frame(latent_hw, cfg.patch_size))
