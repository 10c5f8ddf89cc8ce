"""Next-clip diffusion: rectified flow with clean-target (x1) prediction.

For a batch of clean latents and its clip layout (METHOD.md, Objective):
  t ~ U(0, 1) once per clip, shared by the clip's frames;
  x_t = t * x1 + (1 - t) * eps, eps ~ N(0, I)       (t = 1 is clean data);
  the clean context copy is itself noised: t_ctx ~ U(context_noise_min, 1) per frame;
  loss = MSE(pred, x1) averaged per frame, then over the real frames of the batch.
Padding frames never contribute. All randomness comes from one generator, so a
step is reproducible from (seed, step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import ObjectiveConfig
from pretrain.layout import Batch, validate_layout


@dataclass
class NoisedBatch:
    x_noisy: torch.Tensor  # [B, F, C, h, w]
    x_clean: torch.Tensor  # context copy, lightly noised
    t: torch.Tensor        # [B, F] per-frame t of its clip
    frame_mask: torch.Tensor  # [B, F] bool


def per_frame_clip_t(layout: list[list[list[int]]], num_frames: int, generator: torch.Generator,
                     device) -> torch.Tensor:
    """[B, F]: one U(0,1) draw per clip, repeated over the clip's frames (padding frames get 1)."""
    rows = []
    for row in layout:
        clip_sizes = [c for sample in row for c in sample]
        draws = torch.rand(len(clip_sizes), generator=generator)
        t = torch.repeat_interleave(draws, torch.tensor(clip_sizes))
        rows.append(torch.cat([t, torch.ones(num_frames - len(t))]))
    return torch.stack(rows).to(device)


def add_noise(batch: Batch, cfg: ObjectiveConfig, generator: torch.Generator) -> NoisedBatch:
    x1 = batch.latents
    B, F = x1.shape[:2]
    t = per_frame_clip_t(batch.layout, F, generator, x1.device)
    eps = torch.randn(x1.shape, generator=generator).to(x1.device, x1.dtype)
    eps_ctx = torch.randn(x1.shape, generator=generator).to(x1.device, x1.dtype)
    lo = cfg.context_noise_min
    t_ctx = (lo + (1 - lo) * torch.rand(B, F, generator=generator)).to(x1.device)
    bc = lambda s: s.to(x1.dtype)[:, :, None, None, None]
    return NoisedBatch(
        x_noisy=bc(t) * x1 + (1 - bc(t)) * eps,
        x_clean=bc(t_ctx) * x1 + (1 - bc(t_ctx)) * eps_ctx,
        t=t.to(x1.dtype),
        frame_mask=batch.frame_mask().to(x1.device),
    )


def masked_frame_mse(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    per_frame = (pred.float() - target.float()).pow(2).flatten(2).mean(-1)  # [B, F]
    mask = frame_mask.float()
    return (per_frame * mask).sum() / mask.sum().clamp_min(1.0)


def next_clip_loss(model, batch: Batch, cfg: ObjectiveConfig, generator: torch.Generator) -> torch.Tensor:
    """One training loss for a batch; `model` is a VideoGPT (or anything with its forward/sequence)."""
    x1 = batch.latents
    validate_layout(batch.layout, x1.shape[1], x1.shape[2], model.cfg.latent_channels)
    noised = add_noise(batch, cfg, generator)
    seq = model.sequence(batch.layout, tuple(x1.shape[-2:]))
    pred = model(noised.x_noisy, noised.x_clean, noised.t, seq)
    return masked_frame_mse(pred, x1, noised.frame_mask)
