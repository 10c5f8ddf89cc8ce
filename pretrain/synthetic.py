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


class SyntheticSource:
    """Batches of moving-square videos as a pure function of (seed, global row index).

    Global step s, micro step m: rows [base, base + rows_per_micro * dp_size) with
    base = (s * accum + m) * rows_per_micro * dp_size; data-parallel rank r takes
    its contiguous block. The same global rows come out whatever the world size,
    so there is no loader state to restore beyond the step itself.
    """

    def __init__(self, cfg, dp_rank: int, dp_size: int):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.videos = moving_square_latents(cfg.synthetic, cfg.model.latent_channels, seed=cfg.train.seed)

    def global_rows(self, step: int, micro: int) -> list[int]:
        b = self.cfg.train.batch_size
        base = (step * self.cfg.train.grad_accum_steps + micro) * b * self.dp_size + self.dp_rank * b
        return list(range(base, base + b))

    def sample(self, global_row: int) -> tuple[int, list[int]]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + global_row)
        video = int(torch.randint(0, self.videos.shape[0], (1,), generator=g))
        F = self.videos.shape[1]
        clips = [1] * F if self.cfg.synthetic.clip_policy == "single_frame" else random_partition(F, g)
        return video, clips

    def batch(self, step: int, micro: int = 0) -> tuple[Batch, list[int]]:
        rows = self.global_rows(step, micro)
        picks = [self.sample(r) for r in rows]
        return (Batch(self.videos[[v for v, _ in picks]], [[c] for _, c in picks],
                      keys=[[f"synthetic-{v}"] for v, _ in picks], frame_interval=[[1] for _ in picks]), rows)

    def state_dict(self) -> dict:
        return {"kind": "synthetic"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic":
            raise ValueError(f"loader state of kind {state.get('kind')!r} cannot resume a synthetic source")
