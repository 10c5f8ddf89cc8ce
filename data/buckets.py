"""Shape buckets, skip reasons and token bounds: what a stage can do with each sample.

A stage can use a stored video only if it has enough frames (data/stage.py,
`interval_bounds`) and if its sample can fit `max_tokens`. Both are known
from the latents shape [T, C, h, w] that index.json records per sample
(data/shard_format.py), so such a sample is a *known skip*: the loader
reports it, counted like any skip, without reading it, and a shard holding
only known skips is never fetched. The token limit is known only when even
the shortest sequence the clip policy can draw exceeds it (`token_range`);
otherwise the sample's own draw (`plan_or_skip`) decides, still unread.

Usable samples are grouped by latent h x w: one bucket per shape, named
"HxW". Samples of one bucket batch together (data/order.py: a step serves one
bucket), so a batch has one shape and a bucket's batches keep one shape (a
GPU graph per bucket, no recompiles). A bucket's per-rank batch size is
data.bucket_batch_size["HxW"] if set, else data.batch_tokens // the most
tokens one of its samples can take if set, else data.batch_size.

The preflight (orchestration/preflight.py) builds the same buckets before any
process starts, so a stage no sample of the dataset fits is refused there
with the message `build_buckets` raises here.

An index written before shapes were recorded gives one bucket of everything
and no known skips (every skip is found at read time, as before); batching
samples of mixed shapes then fails in collate with what to do.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from data.batch import patches_per_frame, sequence_length
from data.shard_format import DatasetMeta
from data.stage import SamplePlan, interval_bounds, plan_sample, sample_rng, sample_tokens
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError

# every reason a position of the stream yields a skip instead of a sample
SKIP_SHORT = "too_short"              # fewer stored frames than the stage's frames at its interval
SKIP_TOKENS = "too_many_tokens"       # the drawn clips exceed data.stage.max_tokens
SKIP_CORRUPT = "corrupt_shard"        # the shard failed its checks (data.corrupt_shards=skip)
SKIP_BAD_SAMPLE = "corrupt_sample"    # a verified shard's sample would not decode as recorded
SKIP_CODES = {-1: SKIP_SHORT, -2: SKIP_TOKENS}  # Buckets.code of a known skip -> its reason


@dataclass(frozen=True, eq=False)  # compared by identity: `code` is an array
class Buckets:
    """Every sample's bucket: `code` per flat sample index (DatasetMeta.offsets + index in shard) is a
    bucket number >= 0, or a key of SKIP_CODES for a known skip."""
    code: np.ndarray
    names: tuple[str, ...]
    batch: tuple[int, ...]   # per-rank batch size of each bucket

    @cached_property  # `code` never changes; these are read at every schedule and loader state
    def sizes(self) -> tuple[int, ...]:
        return tuple(np.bincount(self.code[self.code >= 0], minlength=len(self.names)).tolist())

    @cached_property
    def num_known_skips(self) -> int:
        return int((self.code < 0).sum())

    @cached_property
    def flat(self) -> bool:
        """One bucket, nothing known to skip: the bucket stream is the epoch order itself."""
        return len(self.names) == 1 and not self.num_known_skips

    @cached_property
    def fingerprint(self) -> str:
        """Changes when the bucket streams would (shapes, or which samples the stage can use)."""
        return hashlib.sha256(self.code.astype(np.int32).tobytes() + json.dumps(self.names).encode()).hexdigest()[:16]


def bucket_name(h: int, w: int) -> str:
    return f"{h}x{w}"


def token_range(stage: StageSamplingConfig, hw: tuple[int, int]) -> tuple[int, int]:
    """Fewest and most tokens a sample of this stage and latent size can take. The last clip has no
    clean copy (data.batch.sequence_length), so the fewest come with the longest last clip: F-1 frames
    with random clips (at least 2 clips), 1 with single frames, F when F = 1; the most with a last clip
    of 1 frame."""
    F, P = stage.frames, patches_per_frame(hw, stage.patch_size)
    longest_last = 1 if stage.clips == "single_frame" else max(1, F - 1)
    return sequence_length([[F - longest_last, longest_last] if F > longest_last else [F]], P), \
        sequence_length([[F - 1, 1] if F > 1 else [1]], P)


def plan_or_skip(stage: StageSamplingConfig, seed: int, epoch: int, position: int, frames: int,
                 hw: tuple[int, int]) -> SamplePlan | str:
    """The one plan of the sample at (epoch, position) of a video of `frames` stored frames and latent
    size `hw` (data/stage.py draws it from (seed, epoch, position)), or why it is skipped."""
    plan = plan_sample(stage, frames, sample_rng(seed, epoch, position))
    if plan is None:
        return SKIP_SHORT
    if sample_tokens(stage, plan.clips, hw) > stage.max_tokens:
        return SKIP_TOKENS
    return plan


def build_buckets(meta: DatasetMeta, cfg: DataConfig, where: str = "index.json") -> Buckets:
    """Buckets of the dataset for the stage `cfg.stage`, with their per-rank batch sizes; a ConfigError
    naming the key when the stage can use no sample at all."""
    N = meta.num_samples
    if meta.shapes is None:
        if cfg.bucket_batch_size:
            raise ConfigError(f"data.bucket_batch_size: {where} records no per-sample shapes (written before "
                              "they were recorded); rebuild the index with the precompute job, or drop the key")
        hw = tuple(meta.latent_shape[-2:]) if meta.latent_shape else None
        if cfg.batch_tokens and hw is None:
            raise ConfigError(f"data.batch_tokens: {where} records no latent shape to size batches by tokens; "
                              "use data.batch_size")
        name = bucket_name(*hw) if hw else "any"
        return Buckets(np.zeros(N, dtype=np.int32), (name,), (_batch(cfg, name, hw),))
    frames, shapes = meta.frames, meta.shapes
    channels = np.unique(shapes[:, 1])
    if len(channels) > 1:
        raise ConfigError(f"{where}: samples have latents of {channels.tolist()} channels; one dataset must "
                          "have one latent channel count (one VAE)")
    lengths, length_of = np.unique(frames, return_inverse=True)
    short = ~np.array([interval_bounds(cfg.stage, int(f)) is not None for f in lengths], dtype=bool)[length_of]
    keys, hw_of = np.unique(shapes[:, 2] << 32 | shapes[:, 3], return_inverse=True)  # (h, w) order
    hws = [(int(k) >> 32, int(k) & 0xFFFFFFFF) for k in keys]
    fewest = np.array([token_range(cfg.stage, hw)[0] for hw in hws], dtype=np.int64)
    too_long = (fewest > cfg.stage.max_tokens)[hw_of]
    ok = ~short & ~too_long
    usable = np.unique(hw_of[ok])  # shapes with a usable sample, in (h, w) order
    bucket_of_hw = np.full(len(hws), -9, dtype=np.int32)
    bucket_of_hw[usable] = np.arange(len(usable), dtype=np.int32)
    code = np.where(short, -1, np.where(too_long, -2, bucket_of_hw[hw_of])).astype(np.int32)
    if not len(usable):
        _refuse(cfg.stage, where, int(frames.max()), short, fewest[hw_of[~short]], hws, hw_of[~short])
    usable = [hws[u] for u in usable.tolist()]
    names = tuple(bucket_name(*hw) for hw in usable)
    unknown = sorted(set(cfg.bucket_batch_size) - set(names))
    if unknown:
        raise ConfigError(f"data.bucket_batch_size: {unknown} name no shape bucket of this stage; the dataset's "
                          f"usable latent shapes are {list(names)} (HxW)")
    return Buckets(code, names, tuple(_batch(cfg, n, hw) for n, hw in zip(names, usable)))


def _refuse(stage: StageSamplingConfig, where: str, longest: int, short: np.ndarray, fewest: np.ndarray,
            hws: list[tuple[int, int]], hw_of_long: np.ndarray) -> None:
    """Why no sample is usable, naming the key to change: frames/interval when every video is too short,
    max_tokens when every long enough one cannot fit."""
    d = stage.interval_value if stage.interval == "fixed" else stage.interval_min
    if short.all():
        raise ConfigError(f"data.stage.frames={stage.frames} at interval >= {d} needs videos of >= "
                          f"{stage.min_video_frames()} frames, but the longest video in {where} has {longest} "
                          "frames; every sample would be skipped (lower data.stage.frames or the interval)")
    i = int(np.argmin(fewest))
    h, w = hws[int(hw_of_long[i])]
    raise ConfigError(f"data.stage.max_tokens={stage.max_tokens}: no sample of {where} fits; the shortest "
                      f"sequence data.stage (frames={stage.frames}, clips={stage.clips}) can draw is {int(fewest[i])} "
                      f"tokens (latent {h}x{w}, patch {stage.patch_size}); every sample would be skipped "
                      f"({int(short.sum())} too short, {int((~short).sum())} too many tokens)")


def _batch(cfg: DataConfig, name: str, hw: tuple[int, int] | None) -> int:
    if name in cfg.bucket_batch_size:
        return cfg.bucket_batch_size[name]
    if cfg.batch_tokens and hw is not None:
        return max(1, cfg.batch_tokens // token_range(cfg.stage, hw)[1])
    return cfg.batch_size
