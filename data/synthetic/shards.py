"""Write a small latent dataset in the real format (tests, bench/loader.py), or only the index
of a large one.

Uses only `data.shard_format`'s writer helpers, so what the loader reads here is
exactly what the precompute farm commits. Each video's latents encode its own
identity: frame t of video v is filled with v * 1000 + t, so a test can check
from the tensor alone which video and which stored frames a sample holds.
Either latent form (data/shard_format.py): `posterior` stores that pattern as
the mean and a constant `std` after it (2C channels).

`write_synthetic_index` publishes the index of a dataset of millions of samples
whose shards are never written (index scale: the bench, tests of the index):
columns built with numpy, realistic frame counts, a few aspect ratios, keys
shaped like the precompute job's.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from data.dataset_index import publish_columns, write_index
from data.shard_format import build_tar, commit_shard, encode_sample, get_fs, shard_stem


def video_latents(video: int, frames: int, shape: tuple[int, int, int], dtype=torch.float32) -> torch.Tensor:
    t = torch.arange(frames, dtype=torch.float64) + video * 1000
    return t.view(-1, 1, 1, 1).expand(frames, *shape).to(dtype).contiguous()


def write_toy_dataset(root: str, shard_sizes: list[int], frames: int | list[int] = 20,
                      shape: tuple[int, int, int] | list[tuple[int, int, int]] = (4, 4, 4),
                      storage_options: dict | None = None, name: str = "train", dtype=torch.float32,
                      record_shapes: bool = True, latent_form: str | None = None, std: float = 0.25,
                      segments: tuple[int, int] | None = None) -> dict:
    """Shards of the given sample counts; `frames` and `shape` [C, h, w] per video (one value for
    all, or one per video in order). record_shapes=False writes an index as it was before the
    per-sample frame counts and shapes were recorded. `latent_form`: None writes an index without
    the field (as before it was recorded: a `sample` dataset), 'sample' records it, 'posterior'
    stores [mean, std] per frame, 2C channels (mean: the pattern above, std: `std`).
    `segments` (max_frames, overlap): a video longer than max_frames is stored as the precompute
    job stores one, as consecutive samples `<key>-s0000`, `<key>-s0001`, ... of at most max_frames
    frames, each starting max_frames - overlap frames after the one before, with their first frames
    recorded (data/videos.py); `shard_sizes` then counts videos.

    Keys are v000000, v000001, ... in writing order. Publishes the next index version
    (data/dataset_index.py); returns index.json as written.
    """
    fs, root = get_fs(root, storage_options)
    total = sum(shard_sizes)
    lengths = [frames] * total if isinstance(frames, int) else list(frames)
    shapes = [tuple(shape)] * total if isinstance(shape[0], int) else [tuple(s) for s in shape]
    if len(lengths) != total or len(shapes) != total:
        raise ValueError(f"frames / shape: got {len(lengths)} lengths and {len(shapes)} shapes for {total} videos")
    manifests, v = {}, 0
    for s, size in enumerate(shard_sizes):
        samples, keys, nframes, recorded, first = [], [], 0, [], []
        for _ in range(size):
            key = f"v{v:06d}"
            lat = video_latents(v, lengths[v], shapes[v], dtype)
            if latent_form == "posterior":
                lat = torch.cat([lat, torch.full_like(lat, std)], dim=1)
            bounds = toy_segments(lengths[v], segments)
            for k, (a, b) in enumerate(bounds):
                skey = key if len(bounds) == 1 else f"{key}-s{k:04d}"
                part = lat[a:b].contiguous()
                meta = {"source": f"toy://{key}", "frames": b - a,
                        **({"source_key": key, "first_frame": a} if len(bounds) > 1 else {})}
                samples.append((skey, encode_sample(part, meta)))
                keys.append(skey)
                recorded.append(list(part.shape))
                first.append(a)
                nframes += b - a
            v += 1
        stem = shard_stem(name, s)
        manifests[stem] = commit_shard(fs, root, stem, build_tar(samples), keys, nframes,
                                       recorded if record_shapes else None, first if record_shapes else None)
    form = {"latent_form": latent_form} if latent_form is not None else {}
    c, h, w = shapes[0]
    return write_index(fs, root, manifests, latent_shape=[2 * c if latent_form == "posterior" else c, h, w],
                       dtype=str(dtype).removeprefix("torch."), **form)


def toy_segments(frames: int, segments: tuple[int, int] | None) -> list[tuple[int, int]]:
    """[start, end) of each stored segment of a toy video (data/video.py's rule, without dropping a short
    last piece): the whole video unless it is longer than segments[0]."""
    cap, overlap = segments or (0, 0)
    if not cap or frames <= cap:
        return [(0, frames)]
    if not 0 <= overlap < cap:
        raise ValueError(f"segments: overlap {overlap} must be in [0, {cap})")
    out = []
    for start in range(0, frames, cap - overlap):
        out.append((start, min(start + cap, frames)))
        if start + cap >= frames:
            return out
    return out


def video_of(key: str) -> int:
    """The toy video a key names (a segment's key `<key>-sNNNN` names its video's)."""
    return int(key[1:].split("-")[0])


# latent [C, h, w] of a 16-channel VAE at 8x downsampling: 16:9, 4:3, 1:1, 9:16 (weights: how common)
SYNTHETIC_SHAPES = ((16, 40, 72), (16, 48, 64), (16, 56, 56), (16, 72, 40))
_SHAPE_WEIGHTS = (0.6, 0.25, 0.1, 0.05)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def synthetic_columns(num_samples: int, shard_size: int = 1000, seed: int = 0, name: str = "train"
                      ) -> dict[str, np.ndarray]:
    """Index columns (data/dataset_index.py) of `num_samples` samples in shards of `shard_size`: frame
    counts 8..256 (log-uniform), shapes drawn from SYNTHETIC_SHAPES, keys `clip<9 digits>-<10 hex>`."""
    rng = np.random.default_rng(seed)
    n, sizes = num_samples, [shard_size] * (num_samples // shard_size)
    if num_samples % shard_size:
        sizes.append(num_samples % shard_size)
    frames = np.exp(rng.uniform(np.log(8), np.log(257), n)).astype(np.uint16)
    shape_ids = rng.choice(len(SYNTHETIC_SHAPES), size=n, p=_SHAPE_WEIGHTS).astype(np.uint16)
    width = 4 + 9 + 1 + 10
    i = np.arange(n, dtype=np.uint64)
    blob = np.empty((n, width), dtype=np.uint8)
    blob[:, :4] = np.frombuffer(b"clip", dtype=np.uint8)
    for d in range(9):
        blob[:, 4 + d] = ord("0") + (i // np.uint64(10 ** (8 - d))) % np.uint64(10)
    blob[:, 13] = ord("-")
    h = (i + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)  # a bijective mix: distinct keys
    for d in range(10):
        blob[:, 14 + d] = _HEX[((h >> np.uint64(60 - 4 * d)) & np.uint64(15)).astype(np.intp)]
    bounds = np.cumsum([0] + sizes)
    shard_frames = np.add.reduceat(frames.astype(np.int64), bounds[:-1]) if n else np.zeros(0, np.int64)
    names = [f"{name}-{s:06d}" for s in range(len(sizes))]
    from_shapes = {"sample_frames": frames, "sample_shape": shape_ids,
                   "shape_table": np.asarray(SYNTHETIC_SHAPES, dtype=np.int32)}
    per_frame = np.asarray([c * h * w * 2 for c, h, w in SYNTHETIC_SHAPES], dtype=np.int64)  # bf16 bytes
    sample_bytes = frames.astype(np.int64) * per_frame[shape_ids]
    return {
        "shard_name": np.array([x.encode() for x in names], dtype=bytes),
        "shard_sha256": np.array([hashlib.sha256(x.encode()).hexdigest().encode() for x in names], dtype="S64"),
        "shard_num_samples": np.asarray(sizes, dtype=np.int64),
        "shard_num_frames": shard_frames,
        "shard_bytes": np.add.reduceat(sample_bytes, bounds[:-1]) if n else np.zeros(0, np.int64),
        "key_blob": blob.reshape(-1),
        "key_offsets": (np.arange(n + 1, dtype=np.int64) * width).astype(np.uint32 if n * width < 2 ** 32
                                                                        else np.int64),
        **from_shapes,
    }


def write_synthetic_index(root: str, num_samples: int, shard_size: int = 1000, seed: int = 0,
                          storage_options: dict | None = None) -> dict:
    """Publish the index of a synthetic dataset (no shard is written). Returns index.json."""
    fs, root = get_fs(root, storage_options)
    return publish_columns(fs, root, synthetic_columns(num_samples, shard_size, seed),
                           latent_channels=SYNTHETIC_SHAPES[0][0], latent_dtype="bfloat16", synthetic=True)
