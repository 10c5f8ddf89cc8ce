"""Shape buckets, skip reasons and token bounds: what a stage can do with each sample.

A sample here is a video (data/videos.py: the segments of a long video are
one sample, of their frames together). A stage can use a video only if it has
enough frames (data/stage.py, `interval_bounds`) and if its sample can fit
`max_tokens`. Both are known from the latents shape [T, C, h, w] that the
dataset index records per stored sample (data/dataset_index.py), so such a
sample is a *known skip*: the loader
reports it, counted like any skip, without reading it, and a shard holding
only known skips is never fetched. The token limit is known only when even
the shortest sequence the clip policy can draw exceeds it (`token_range`);
otherwise the sample's own draw (`plan_or_skip`) decides, still unread.
A sample of the held-out split (data/heldout_split.py, eval.heldout_fraction)
is a known skip of its own reason: evaluated, never trained on.

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
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from data.batch import patches_per_frame, sequence_length
from data.dataset_index import DatasetMeta
from data.heldout_split import heldout_mask
from data.stage import SamplePlan, interval_bounds, plan_sample, sample_rng, sample_tokens
from data.videos import Videos
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError

# every reason a position of the stream yields a skip instead of a sample
SKIP_SHORT = "too_short"              # fewer stored frames than the stage's frames at its interval
SKIP_TOKENS = "too_many_tokens"       # the drawn clips exceed data.stage.max_tokens
SKIP_CORRUPT = "corrupt_shard"        # the shard failed its checks (data.corrupt_shards=skip)
SKIP_BAD_SAMPLE = "corrupt_sample"    # a verified shard's sample would not decode as recorded
SKIP_HELDOUT = "held_out"             # in the held-out split (data/heldout_split.py): evaluated, never trained on
SKIP_CODES = {-1: SKIP_SHORT, -2: SKIP_TOKENS, -3: SKIP_HELDOUT}  # Buckets.code of a known skip -> its reason
_NSKIP = len(SKIP_CODES)


_CHUNK = 1 << 20  # samples per pass over the index columns: temporaries stay ~10 MB at any size


def _chunks(n: int) -> range:
    return range(0, n, _CHUNK)


@dataclass(frozen=True, eq=False)  # compared by identity: `code` is an array
class Buckets:
    """Every video's bucket: `code` per flat video index (`videos.offsets` + index in shard) is a
    bucket number >= 0, or a key of SKIP_CODES for a known skip.

    `code` is a function of each video's frame count and latent shape; `recipe` (videos, short-by-frames
    table, code-by-shape table) recomputes it, so Buckets pickles without its [V] array: a DataLoader
    worker started by spawn remaps the index and rebuilds `code` instead of receiving a copy."""
    code: np.ndarray
    names: tuple[str, ...]
    batch: tuple[int, ...]   # per-rank batch size of each bucket
    recipe: tuple | None = None
    videos: Videos | None = None  # the videos `code` numbers (data/videos.py)

    def __reduce__(self):
        if self.recipe is None:
            return Buckets, (self.code, self.names, self.batch, None, self.videos)
        return _rebuilt, (self.recipe, self.names, self.batch)

    @cached_property  # `code` never changes; these are read at every schedule and loader state
    def _counts(self) -> np.ndarray:
        """Samples per code + _NSKIP (known skips first), counted in passes (no [N]-sized temporaries)."""
        out = np.zeros(len(self.names) + _NSKIP, dtype=np.int64)
        for lo in _chunks(len(self.code)):
            out += np.bincount(self.code[lo:lo + _CHUNK] + _NSKIP, minlength=len(out))
        return out

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self._counts[_NSKIP:].tolist())

    @cached_property
    def num_known_skips(self) -> int:
        return int(self._counts[:_NSKIP].sum())

    @cached_property
    def flat(self) -> bool:
        """One bucket, nothing known to skip: the bucket stream is the epoch order itself."""
        return len(self.names) == 1 and not self.num_known_skips

    @cached_property
    def fingerprint(self) -> str:
        """Changes when the bucket streams would (shapes, or which samples the stage can use)."""
        h = hashlib.sha256()
        for lo in _chunks(len(self.code)):  # the digest of the whole code as int32, then the names
            h.update(self.code[lo:lo + _CHUNK].astype(np.int32).tobytes())
        h.update(json.dumps(self.names).encode())
        return h.hexdigest()[:16]


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


def _code(videos: Videos, short_of_frames: np.ndarray | None, code_of_shape: np.ndarray | None,
          heldout: float = 0.0) -> np.ndarray:
    """Each video's code from the lookup tables: -3 if it is held out (its key's hash below `heldout`),
    else -1 if its frame count is too short, else its shape's."""
    dtype = np.int16 if code_of_shape is None or len(code_of_shape) < 2 ** 15 else np.int32
    code = np.zeros(videos.num, dtype=dtype)
    if short_of_frames is not None:
        by_shape = code_of_shape.astype(dtype)
        frames, shape_ids = videos.frames, videos.shape_ids
        for lo in _chunks(len(code)):
            hi = lo + _CHUNK
            code[lo:hi] = np.where(short_of_frames[frames[lo:hi]], -1, by_shape[shape_ids[lo:hi]])
    if heldout > 0:
        mask = heldout_mask(videos.meta, heldout)  # by sample: every segment of a video has its video's
        code[mask if videos.starts is None else mask[videos.starts[:-1]]] = -3
    return code


def _rebuilt(recipe: tuple, names: tuple[str, ...], batch: tuple[int, ...]) -> Buckets:
    return Buckets(_code(*recipe), names, batch, recipe, recipe[0])


def build_buckets(meta: DatasetMeta, cfg: DataConfig, where: str = "index.json", heldout: float = 0.0) -> Buckets:
    """Buckets of the dataset's videos (data/videos.py) for the stage `cfg.stage`, with their per-rank
    batch sizes (the videos of the held-out split at fraction `heldout` a known skip of their own); a
    ConfigError naming the key when the stage can use no video at all. Decided per distinct frame count
    and per distinct shape (few), then looked up per video in passes of _CHUNK over the columns."""
    videos = Videos.of(meta)
    if not meta.has_shapes:
        if cfg.bucket_batch_size:
            raise ConfigError(f"data.bucket_batch_size: {where} records no per-sample shapes (written before "
                              "they were recorded); rebuild the index with the precompute job, or drop the key")
        hw = tuple(meta.latent_shape[-2:]) if meta.latent_shape else None
        if cfg.batch_tokens and hw is None:
            raise ConfigError(f"data.batch_tokens: {where} records no latent shape to size batches by tokens; "
                              "use data.batch_size")
        name = bucket_name(*hw) if hw else "any"
        recipe = (videos, None, None, heldout)
        return Buckets(_code(*recipe), (name,), (_batch(cfg, name, hw),), recipe, videos)
    N, k, frames, shape_ids = videos.num, len(meta.shape_table), videos.frames, videos.shape_ids
    count_of_length = np.zeros(int(frames.max()) + 1, dtype=np.int64)
    for lo in _chunks(N):
        count_of_length += np.bincount(frames[lo:lo + _CHUNK], minlength=len(count_of_length))
    lengths = np.flatnonzero(count_of_length)
    short_of_frames = np.ones(len(count_of_length), dtype=bool)
    short_of_frames[lengths] = [interval_bounds(cfg.stage, int(f)) is None for f in lengths]
    count_of_shape, long_of_shape = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    for lo in _chunks(N):
        ids = shape_ids[lo:lo + _CHUNK]
        count_of_shape += np.bincount(ids, minlength=k)
        long_of_shape += np.bincount(ids[~short_of_frames[frames[lo:lo + _CHUNK]]], minlength=k)
    table = meta.shape_table.astype(np.int64)
    channels = np.unique(table[count_of_shape > 0, 0])
    if len(channels) > 1:
        raise ConfigError(f"{where}: samples have latents of {channels.tolist()} channels; one dataset must "
                          "have one latent channel count (one VAE)")
    # distinct (h, w) of the shape table, in (h, w) order; each shape's hw class
    keys, hw_of_shape = np.unique(table[:, 1] << 32 | table[:, 2], return_inverse=True)
    hw_of_shape = hw_of_shape.reshape(-1)
    hws = [(int(x) >> 32, int(x) & 0xFFFFFFFF) for x in keys]
    fewest = np.array([token_range(cfg.stage, hw)[0] for hw in hws], dtype=np.int64)
    too_long_hw = fewest > cfg.stage.max_tokens
    long_of_hw = np.bincount(hw_of_shape, weights=long_of_shape, minlength=len(hws))
    usable = np.flatnonzero((long_of_hw > 0) & ~too_long_hw)  # shapes with a usable sample, in (h, w) order
    bucket_of_hw = np.full(len(hws), -9, dtype=np.int32)
    bucket_of_hw[usable] = np.arange(len(usable), dtype=np.int32)
    code_of_shape = np.where(too_long_hw, -2, bucket_of_hw)[hw_of_shape]
    if not len(usable):
        num_long = int(long_of_shape.sum())
        present = np.flatnonzero(long_of_hw > 0)
        _refuse(cfg.stage, where, int(lengths.max()), num_long == 0, fewest[present], hws, present,
                N - num_long, num_long)
    recipe = (videos, short_of_frames, code_of_shape, heldout)
    usable = [hws[u] for u in usable.tolist()]
    names = tuple(bucket_name(*hw) for hw in usable)
    unknown = sorted(set(cfg.bucket_batch_size) - set(names))
    if unknown:
        raise ConfigError(f"data.bucket_batch_size: {unknown} name no shape bucket of this stage; the dataset's "
                          f"usable latent shapes are {list(names)} (HxW)")
    return Buckets(_code(*recipe), names, tuple(_batch(cfg, n, hw) for n, hw in zip(names, usable)), recipe,
                   videos)


def _refuse(stage: StageSamplingConfig, where: str, longest: int, all_short: bool, fewest: np.ndarray,
            hws: list[tuple[int, int]], present: np.ndarray, num_short: int, num_long: int) -> None:
    """Why no sample is usable, naming the key to change: frames/interval when every video is too short,
    max_tokens when every long enough one cannot fit. `fewest`: the shortest draw of each latent size
    `present` among the long enough samples."""
    d = stage.interval_value if stage.interval == "fixed" else stage.interval_min
    if all_short:
        raise ConfigError(f"data.stage.frames={stage.frames} at interval >= {d} needs videos of >= "
                          f"{stage.min_video_frames()} frames, but the longest video in {where} has {longest} "
                          "frames; every sample would be skipped (lower data.stage.frames or the interval)")
    i = int(np.argmin(fewest))
    h, w = hws[int(present[i])]
    raise ConfigError(f"data.stage.max_tokens={stage.max_tokens}: no sample of {where} fits; the shortest "
                      f"sequence data.stage (frames={stage.frames}, clips={stage.clips}) can draw is {int(fewest[i])} "
                      f"tokens (latent {h}x{w}, patch {stage.patch_size}); every sample would be skipped "
                      f"({num_short} too short, {num_long} too many tokens)")


def batch_of_shape(cfg: DataConfig, hw: tuple[int, int]) -> int:
    """The per-rank batch size of the bucket of latent shape HW (what the loader gives its steps)."""
    return _batch(cfg, bucket_name(*hw), hw)


def heaviest_shape(names: Iterable[str], cfg: DataConfig) -> tuple[int, int] | None:
    """Of buckets `names` ("HxW"), the latent shape whose steps carry the most tokens (its batch x the
    stage's longest sample): the one a memory plan must fit. None when no shape is known ("any": an
    index of before per-sample shapes that records none)."""
    shapes = [tuple(int(x) for x in n.split("x")) for n in names if n != "any"]
    if not shapes:
        return None
    return max(shapes, key=lambda hw: (batch_of_shape(cfg, hw) * token_range(cfg.stage, hw)[1], hw))


def _batch(cfg: DataConfig, name: str, hw: tuple[int, int] | None) -> int:
    if name in cfg.bucket_batch_size:
        return cfg.bucket_batch_size[name]
    if cfg.batch_tokens and hw is not None:
        return max(1, cfg.batch_tokens // token_range(cfg.stage, hw)[1])
    return cfg.batch_size
