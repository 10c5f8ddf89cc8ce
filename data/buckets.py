"""Shape buckets and early filtering: every sample's bucket, decided from index.json alone.

A stage can use a stored video only if it has enough frames (data/stage.py,
`interval_bounds`) and if its sample can fit `max_tokens`. Both are known
from the frame count and latents shape that index.json records per sample
(data/shard_format.py), so such a sample is a *known skip*: the loader
reports it, counted like any skip, without reading it, and a shard holding
only known skips is never fetched. The token limit is known only when even
the shortest sequence the clip policy can draw exceeds it; otherwise the
draw decides at read time (data/loader.py).

Usable samples are grouped by latent h x w: one bucket per shape, named
"HxW". Samples of one bucket batch together (data/order.py: a step serves one
bucket), so a batch has one shape and a bucket's batches keep one shape (a
GPU graph per bucket, no recompiles). A bucket's per-rank batch size is
data.bucket_batch_size["HxW"] if set, else data.batch_tokens // the most
tokens one of its samples can take if set, else data.batch_size.

An index written before shapes were recorded gives one bucket of everything
and no known skips (every skip is found at read time, as before); batching
samples of mixed shapes then fails in collate with what to do.
"""
from __future__ import annotations

import numpy as np

from data.batch import patches_per_frame, sequence_length
from data.order import Buckets, DatasetMeta
from data.stage import SKIP_SHORT, SKIP_TOKENS, interval_bounds
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError

SKIP_CODES = {-1: SKIP_SHORT, -2: SKIP_TOKENS}


def bucket_name(h: int, w: int) -> str:
    return f"{h}x{w}"


def token_range(stage: StageSamplingConfig, hw: tuple[int, int]) -> tuple[int, int]:
    """Fewest and most tokens a sample of this stage and latent size can take (the last clip is
    never cleaned: 1 frame at most, F-1 frames at least with random clips, F with one clip of F)."""
    F, P = stage.frames, patches_per_frame(hw, stage.patch_size)
    longest_last = 1 if stage.clips == "single_frame" else max(1, F - 1)
    return sequence_length([[F - longest_last, longest_last] if F > longest_last else [F]], P), \
        sequence_length([[F - 1, 1] if F > 1 else [1]], P)


def build_buckets(meta: DatasetMeta, cfg: DataConfig, latent_shape: list | None = None,
                  where: str = "index.json") -> Buckets:
    """Buckets of the dataset for the stage `cfg.stage`, with their per-rank batch sizes."""
    N = meta.num_samples
    if meta.shapes is None:
        if cfg.bucket_batch_size:
            raise ConfigError(f"data.bucket_batch_size: {where} records no per-sample shapes (written before "
                              "they were recorded); rebuild the index with the precompute job, or drop the key")
        hw = tuple(latent_shape[-2:]) if latent_shape and len(latent_shape) >= 2 else None
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
    too_long = np.array([token_range(cfg.stage, hw)[0] > cfg.stage.max_tokens for hw in hws], dtype=bool)[hw_of]
    ok = ~short & ~too_long
    usable = np.unique(hw_of[ok])  # shapes with a usable sample, in (h, w) order
    bucket_of_hw = np.full(len(hws), -9, dtype=np.int32)
    bucket_of_hw[usable] = np.arange(len(usable), dtype=np.int32)
    code = np.where(short, -1, np.where(too_long, -2, bucket_of_hw[hw_of])).astype(np.int32)
    usable = [hws[u] for u in usable.tolist()]
    names = tuple(bucket_name(*hw) for hw in usable)
    if not names:
        raise ConfigError(f"data.stage: every sample of {where} is skipped before reading "
                          f"(too_short: {int((code == -1).sum())}, too_many_tokens: {int((code == -2).sum())}); "
                          "check data.stage (frames, interval, max_tokens) against the dataset")
    unknown = sorted(set(cfg.bucket_batch_size) - set(names))
    if unknown:
        raise ConfigError(f"data.bucket_batch_size: {unknown} name no shape bucket of this stage; the dataset's "
                          f"usable latent shapes are {list(names)} (HxW)")
    return Buckets(code, names, tuple(_batch(cfg, n, hw) for n, hw in zip(names, usable)))


def _batch(cfg: DataConfig, name: str, hw: tuple[int, int] | None) -> int:
    if name in cfg.bucket_batch_size:
        return cfg.bucket_batch_size[name]
    if cfg.batch_tokens and hw is not None:
        return max(1, cfg.batch_tokens // token_range(cfg.stage, hw)[1])
    return cfg.batch_size
