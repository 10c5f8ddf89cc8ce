"""Write a small latent dataset in the real format (tests, bench/loader.py).

Uses only `data.shard_format`'s writer helpers, so what the loader reads here is
exactly what the precompute farm commits. Each video's latents encode its own
identity: frame t of video v is filled with v * 1000 + t, so a test can check
from the tensor alone which video and which stored frames a sample holds.
"""
from __future__ import annotations

import torch

from data.shard_format import build_tar, commit_shard, encode_sample, get_fs, shard_stem, write_index


def video_latents(video: int, frames: int, shape: tuple[int, int, int], dtype=torch.float32) -> torch.Tensor:
    t = torch.arange(frames, dtype=torch.float64) + video * 1000
    return t.view(-1, 1, 1, 1).expand(frames, *shape).to(dtype).contiguous()


def write_toy_dataset(root: str, shard_sizes: list[int], frames: int | list[int] = 20,
                      shape: tuple[int, int, int] | list[tuple[int, int, int]] = (4, 4, 4),
                      storage_options: dict | None = None, name: str = "train", dtype=torch.float32,
                      record_shapes: bool = True) -> dict:
    """Shards of the given sample counts; `frames` and `shape` [C, h, w] per video (one value for
    all, or one per video in order). record_shapes=False writes an index as it was before the
    per-sample frame counts and shapes were recorded.

    Keys are v000000, v000001, ... in writing order. Returns the index dict.
    """
    fs, root = get_fs(root, storage_options)
    total = sum(shard_sizes)
    lengths = [frames] * total if isinstance(frames, int) else list(frames)
    shapes = [tuple(shape)] * total if isinstance(shape[0], int) else [tuple(s) for s in shape]
    if len(lengths) != total or len(shapes) != total:
        raise ValueError(f"frames / shape: got {len(lengths)} lengths and {len(shapes)} shapes for {total} videos")
    manifests, v = {}, 0
    for s, size in enumerate(shard_sizes):
        samples, keys, nframes, recorded = [], [], 0, []
        for _ in range(size):
            key = f"v{v:06d}"
            lat = video_latents(v, lengths[v], shapes[v], dtype)
            samples.append((key, encode_sample(lat, {"source": f"toy://{key}", "frames": lengths[v]})))
            keys.append(key)
            recorded.append(list(lat.shape))
            nframes += lengths[v]
            v += 1
        stem = shard_stem(name, s)
        manifests[stem] = commit_shard(fs, root, stem, build_tar(samples), keys, nframes,
                                       recorded if record_shapes else None)
    return write_index(fs, root, manifests, latent_shape=list(shapes[0]), dtype=str(dtype).removeprefix("torch."))


def video_of(key: str) -> int:
    return int(key[1:])
