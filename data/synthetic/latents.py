"""Moving-square latents: a fixed tiny dataset whose future is predictable from its past.

Each video is a bright square drifting with constant velocity (bouncing off the
edges) on a faint background, written straight into latent space: what
`train.data: synthetic` trains on (data/sources.py), the objective tests, the
sweep's trials and its held-out set.
"""
from __future__ import annotations

import torch

from jobconfig.data import SyntheticDataConfig


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
