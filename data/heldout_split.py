"""The held-out split of a latent dataset: which samples training never sees, by key hash.

A sample is held out when the hash of its video's key, read as a number u in [0, 1), is below
the configured fraction (eval.heldout_fraction). The video's key is the sample's key less a
segment suffix `-sNNNN` (data/precompute_plan.py `source_key`), so the segments of one long
video fall on the same side: a video is never both trained on and evaluated. Membership depends
on the key alone: the split is stable as the dataset grows (new shards add their own held-out
samples, old ones keep theirs), independent of shard order, seed and stage. Held-out videos are
a known skip of the training loader (data/buckets.py, SKIP_HELDOUT), so the training order stays
a pure function of (seed, epoch, position); with the fraction 0 nothing changes.

The hash (`key_hashes`) is part of the data format: changing it would move samples between
training and evaluation in every existing run, so it is versioned (SPLIT_VERSION) and
computed vectorised over the index's key column (no Python loop per key: an index of ten
million keys splits in about a second).
"""
from __future__ import annotations

import numpy as np

from data.dataset_index import DatasetMeta
from jobconfig.errors import ConfigError

SPLIT_VERSION = 2  # 2: segments split by their video's key (1: each by its own)
_P = np.uint64(0x100000001B3)   # FNV-64 prime: the polynomial base over the key's bytes
_CHUNK = 1 << 20                 # keys per pass: temporaries stay bounded at any dataset size


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def hash_keys(blob: np.ndarray, offsets: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """uint64 hash of each key blob[offsets[i]:offsets[i+1]] (keys are non-empty), or of its first
    bytes, up to ends[i], if given: the polynomial sum (byte + 1) * P^(bytes after it) mod 2^64, plus
    the length, then mixed."""
    offsets = np.asarray(offsets, dtype=np.int64)
    ends = offsets[1:] if ends is None else np.asarray(ends, dtype=np.int64)
    lengths = ends - offsets[:-1]
    if len(lengths) and lengths.min() <= 0:
        raise ValueError("hash_keys: an empty key")
    if not len(lengths):
        return np.zeros(0, dtype=np.uint64)
    powers = np.cumprod(np.full(int(lengths.max()), _P, dtype=np.uint64), dtype=np.uint64)  # wraps mod 2^64
    powers = np.concatenate([[np.uint64(1)], powers[:-1]])
    b = np.asarray(blob[offsets[0]:offsets[-1]], dtype=np.uint64) + np.uint64(1)
    key_of = np.repeat(np.arange(len(lengths)), np.diff(offsets))
    after = (ends[key_of] - 1 - np.arange(offsets[0], offsets[-1])).astype(np.int64)
    if (after < 0).any():  # bytes cut off the end of their key add nothing
        b[after < 0] = 0
        after = np.maximum(after, 0)
    with np.errstate(over="ignore"):
        h = np.add.reduceat(b * powers[after], offsets[:-1] - offsets[0], dtype=np.uint64)
        h = h + lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _mix(h)


def key_hash(key: str) -> int:
    """The hash of one key (the same as `key_hashes` gives it in an index)."""
    raw = np.frombuffer(key.encode(), dtype=np.uint8)
    return int(hash_keys(raw, np.array([0, len(raw)]))[0])


def video_key_ends(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Where each key blob[offsets[i]:offsets[i+1]] ends once a segment suffix `-s` + 4 or more digits is
    cut off (data/precompute_plan.py `source_key`, vectorised): the end of its video's key."""
    offsets = np.asarray(offsets, dtype=np.int64)
    start, end = offsets[:-1], offsets[1:]
    digits = np.zeros(len(start), dtype=np.int64)  # trailing digits of each key
    going = np.ones(len(start), dtype=bool)
    while going.any():
        at = end - digits - 1
        idx = np.flatnonzero(going)
        ok = at[idx] >= start[idx]
        c = np.zeros(len(idx), dtype=np.uint8)
        c[ok] = blob[at[idx][ok]]
        is_digit = ok & (c >= ord("0")) & (c <= ord("9"))
        digits[idx[is_digit]] += 1
        going[idx[~is_digit]] = False
    cut = end - digits - 2  # where `-s` would start
    has = (digits >= 4) & (cut > start)
    idx = np.flatnonzero(has)
    has[idx] = (blob[cut[idx]] == ord("-")) & (blob[cut[idx] + 1] == ord("s"))
    return np.where(has, cut, end)


def key_hashes(meta: DatasetMeta, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """uint64 hash of the video keys of samples [lo, hi) (flat indices): a sample's key less its segment
    suffix, so every segment of a video has its video's hash (`key_hash` of the input's key)."""
    if meta.key_offsets is None:
        raise ConfigError(f"eval.heldout_fraction: {meta.where} lists no sample keys (an index of format 1); "
                          "rebuild the index with the precompute job, or use eval.root")
    hi = meta.num_samples if hi is None else hi
    offsets = np.asarray(meta.key_offsets[lo:hi + 1], dtype=np.int64)
    return hash_keys(meta.key_blob, offsets, video_key_ends(meta.key_blob, offsets))


def unit(h: np.ndarray) -> np.ndarray:
    """A hash as a number in [0, 1) (its top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def heldout_mask(meta: DatasetMeta, fraction: float) -> np.ndarray:
    """[N] bool: the samples held out at `fraction` (all False at 0, without reading a key)."""
    mask = np.zeros(meta.num_samples, dtype=bool)
    if fraction <= 0:
        return mask
    for lo in range(0, meta.num_samples, _CHUNK):
        hi = min(lo + _CHUNK, meta.num_samples)
        mask[lo:hi] = unit(key_hashes(meta, lo, hi)) < fraction
    return mask


def heldout_samples(meta: DatasetMeta, fraction: float | None, limit: int, videos: bool = False) -> list[int]:
    """Flat indices of up to `limit` held-out samples, the lowest key hashes first (so the set a run
    evaluates changes only when a new sample's hash is lower than one of them). `fraction` None:
    every sample of the dataset is a candidate (a separate held-out root). `videos`: only the first
    segment of each video is a candidate (its first frame is 0, data/videos.py), so a long video
    takes one place, not one per segment."""
    chosen = np.zeros(0, dtype=np.int64)
    best = np.zeros(0, dtype=np.uint64)
    first = meta.first_frames if videos else None
    for lo in range(0, meta.num_samples, _CHUNK):
        hi = min(lo + _CHUNK, meta.num_samples)
        h = key_hashes(meta, lo, hi)
        idx = np.arange(lo, hi, dtype=np.int64)
        keep = np.ones(len(idx), dtype=bool) if fraction is None else unit(h) < fraction
        if first is not None:
            keep &= np.asarray(first[lo:hi]) == 0
        h, idx = h[keep], idx[keep]
        h, idx = np.concatenate([best, h]), np.concatenate([chosen, idx])
        order = np.lexsort((idx, h))[:limit]  # by hash, ties by index: deterministic
        best, chosen = h[order], idx[order]
    return chosen.tolist()
