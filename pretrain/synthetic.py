"""Moving-square latents: a fixed tiny dataset whose future is predictable from its past.

Each video is a bright square drifting with constant velocity (bouncing off the
edges) on a faint background, written straight into latent space. It is what
the objective test and the interim main job train on before real shards exist.
"""
from __future__ import annotations

import torch

from pretrain.config import SyntheticDataConfig
from pretrain.layout import Batch


def moving_square_latents(cfg: SyntheticDataConfig, channels: int, seed: int = 0) -> torch.Tensor:
    """[N, F, C, h, w] float32 latents, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    N, F, h, w = cfg.num_videos, cfg.frames, cfg.latent_height, cfg.latent_width
    size = max(2, min(h, w) // 3)
    videos = torch.full((N, F, channels, h, w), -0.5)
    for n in range(N):
        y, x = torch.randint(0, h - size + 1, (2,), generator=g).tolist()
        x = torch.randint(0, w - size + 1, (1,), generator=g).item()
        vy, vx = (torch.randint(0, 2, (2,), generator=g) * 2 - 1).tolist()
        colour = torch.rand(channels, generator=g) * 1.5 + 0.5
        for f in range(F):
            videos[n, f, :, y:y + size, x:x + size] = colour[:, None, None]
            if not 0 <= y + vy <= h - size:
                vy = -vy
            if not 0 <= x + vx <= w - size:
                vx = -vx
            y, x = y + vy, x + vx
    return videos


def random_partition(frames: int, g: torch.Generator) -> list[int]:
    """K ~ U{2..F} clips with random cut points (METHOD.md, stages 2-4)."""
    k = int(torch.randint(2, frames + 1, (1,), generator=g))
    cuts = sorted(torch.randperm(frames - 1, generator=g)[: k - 1].add(1).tolist())
    bounds = [0, *cuts, frames]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def synthetic_batches(videos: torch.Tensor, cfg: SyntheticDataConfig, batch_size: int, seed: int):
    """Endless batches of whole videos with fresh clip partitions; deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    N, F = videos.shape[:2]
    while True:
        idx = torch.randint(0, N, (batch_size,), generator=g).tolist()
        if cfg.clip_policy == "single_frame":
            layout = [[[1] * F] for _ in idx]
        else:
            layout = [[random_partition(F, g)] for _ in idx]
        yield Batch(videos[idx], layout, keys=[[f"synthetic-{i}"] for i in idx],
                    frame_interval=[[1] for _ in idx])
