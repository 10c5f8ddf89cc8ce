"""Next-clip diffusion: rectified flow with clean-target (x1) prediction.

For a batch of clean latents and its clip sizes (METHOD.md, Objective):
  t ~ U(0, 1) once per clip, shared by the clip's frames;
  x_t = t * x1 + (1 - t) * eps, eps ~ N(0, I)       (t = 1 is clean data);
  the clean context copy is itself noised: t_ctx ~ U(context_noise_min, 1) per frame;
  loss = MSE(pred, x1) averaged per frame, then over a row's real frames, then over the rows.
Padding frames never contribute. All randomness of a row comes from its own
seed (`row_seeds`), which the caller derives from (run seed, global sample
index): the noise a sample gets does not depend on which rank, batch slot or
world size it landed in, so data-parallel runs match single-process runs and
resumed runs match uninterrupted ones.

Posterior-form batches (`Batch.moments`: the VAE posterior's mean and std per frame, METHOD.md
Latents) are drawn from here, as the reference draws `latent_dist.sample()` inside every step: the
noisy target's clean latents x1 = mean + std * n1 and the context copy's source mean + std * n2,
n1 and n2 independent, from the row's own posterior stream (`posterior_seed`: the row seed with its
own salt, so the t/eps draws above are those of a single-draw batch, and a sample's draws, like its
noise, depend only on run seed and global index: a new draw every epoch, the same on resume and on
any world size). The loss target is that x1. Single-draw batches (`sample` form) are unchanged.

Rows of one batch: every draw of a row (t, eps, eps_ctx, t_ctx, the posterior's) is made over its
own frames, and each row weighs the same in the loss, so a row padded to a longer row's length
(packing) trains exactly as it would alone, and a batch of B rows per device as the reference's
batch 1 on B devices (METHOD.md: it trains batch 1, its collator is wrong for more).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.batch import Batch, split_moments, validate_clips
from jobconfig.train import ObjectiveConfig

POSTERIOR_STREAM = 0x504F5354  # "POST": salt of a row's posterior draws, apart from its t/eps stream


@dataclass
class NoisedBatch:
    x_noisy: torch.Tensor  # [B, F, C, h, w]
    x_clean: torch.Tensor  # context copy, lightly noised
    t: torch.Tensor        # [B, F] per-frame t of its clip
    frame_mask: torch.Tensor  # [B, F] bool
    x1: torch.Tensor       # the clean latents of the noisy copy: the loss target


def row_seed(run_seed: int, global_row: int, salt: int = 0) -> int:
    """A 63-bit seed for one batch row from (run seed, global row index, salt), well mixed."""
    return int(np.random.SeedSequence([run_seed, global_row, salt]).generate_state(1, np.uint64)[0] >> 1)


def _clip_t(clip_sizes: list[int], num_frames: int, g: torch.Generator) -> torch.Tensor:
    """[F]: one U(0,1) draw per clip, repeated over the clip's frames (padding frames get 1)."""
    draws = torch.rand(len(clip_sizes), generator=g)
    t = torch.repeat_interleave(draws, torch.tensor(clip_sizes))
    return torch.cat([t, torch.ones(num_frames - len(t))])


def per_frame_clip_t(clips: list[list[list[int]]], num_frames: int, row_seeds: list[int]) -> torch.Tensor:
    """[B, F] per-frame t, each row from its own seed (the same draws `add_noise` makes)."""
    return torch.stack([_clip_t([c for s in row for c in s], num_frames, torch.Generator().manual_seed(seed))
                        for row, seed in zip(clips, row_seeds)])


def _row_normal(g: torch.Generator, frames: int, padded: int, shape) -> torch.Tensor:
    """[padded, *shape]: N(0, 1) from `g` for a row's `frames` real frames, then zeros for its padding
    (a row's draws are made over its own frames: they never depend on the batch's padded length)."""
    return torch.cat([torch.randn(frames, *shape, generator=g), torch.zeros(padded - frames, *shape)])


def posterior_seed(seed: int) -> int:
    """The seed of a row's posterior draws, from its row seed (`row_seed`)."""
    return int(np.random.SeedSequence([seed, POSTERIOR_STREAM]).generate_state(1, np.uint64)[0] >> 1)


def posterior_draws(moments: torch.Tensor, row_seeds: list[int],
                    frames: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, F, 2C, h, w] moments -> (x1, context source), each [B, F, C, h, w]: mean + std * n, two
    independent n per row from its posterior stream (drawn on the CPU in fp32, like eps; the sum in
    fp32 or wider, then in the batch's dtype). `frames`: each row's real frames (default F); n is
    drawn for those only (0 on padding), so a row's draws do not depend on the batch's padded length."""
    mean, std = split_moments(moments, dim=2)
    F, shape = mean.shape[1], mean.shape[2:]
    n1, n2 = [], []
    for seed, f in zip(row_seeds, frames or [F] * len(row_seeds)):
        g = torch.Generator().manual_seed(posterior_seed(seed))
        n1.append(_row_normal(g, f, F, shape))
        n2.append(_row_normal(g, f, F, shape))
    wide = torch.promote_types(moments.dtype, torch.float32)
    n1, n2 = (torch.stack(n).to(moments.device, wide) for n in (n1, n2))
    m, s = mean.to(wide), std.to(wide)
    return (m + s * n1).to(moments.dtype), (m + s * n2).to(moments.dtype)


def add_noise(batch: Batch, cfg: ObjectiveConfig, row_seeds: list[int],
              fixed_t: list[float] | None = None) -> NoisedBatch:
    """`fixed_t`: one noise level per row for every clip of the row (held-out evaluation,
    pretrain/evaluation/latent_eval.py); the row's draws are made as without it, so its noise
    eps is the same at every level. A posterior-form batch (`batch.moments`) is drawn first
    (`posterior_draws`): the noisy copy noises x1, the context copy the independent second draw."""
    B = batch.latents.shape[0]
    if len(row_seeds) != B:
        raise ValueError(f"row_seeds: got {len(row_seeds)} seeds for a batch of {B} rows")
    if batch.moments:
        x1, source = posterior_draws(batch.latents, row_seeds, batch.frames_per_row())
    else:
        x1 = source = batch.latents
    F, shape = x1.shape[1], x1.shape[2:]
    lo = cfg.context_noise_min
    ts, eps, eps_ctx, t_ctx = [], [], [], []
    # each row draws over its own frames only, so a row padded to a longer row's length gets the noise
    # it gets alone (batch B per device = batch 1 B times); padding: eps 0, t_ctx 1, t 1 (_clip_t)
    for r, (row, seed, f) in enumerate(zip(batch.clips, row_seeds, batch.frames_per_row())):
        g = torch.Generator().manual_seed(seed)
        ts.append(_clip_t([c for s in row for c in s], F, g))
        if fixed_t is not None:
            ts[-1] = torch.full((F,), float(fixed_t[r]))
        eps.append(_row_normal(g, f, F, shape))
        eps_ctx.append(_row_normal(g, f, F, shape))
        t_ctx.append(torch.cat([lo + (1 - lo) * torch.rand(f, generator=g), torch.ones(F - f)]))
    t = torch.stack(ts).to(x1.device)
    t_ctx = torch.stack(t_ctx).to(x1.device)
    eps = torch.stack(eps).to(x1.device, x1.dtype)
    eps_ctx = torch.stack(eps_ctx).to(x1.device, x1.dtype)
    bc = lambda s: s.to(x1.dtype)[:, :, None, None, None]
    return NoisedBatch(
        x_noisy=bc(t) * x1 + (1 - bc(t)) * eps,
        x_clean=bc(t_ctx) * source + (1 - bc(t_ctx)) * eps_ctx,
        t=t.to(x1.dtype),
        frame_mask=batch.frame_mask().to(x1.device),
        x1=x1,
    )


def masked_frame_mse(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """The mean over rows of each row's MSE over its real frames (padding excluded): the reference
    trains batch 1 per device with the MSE's mean over frames, so B rows here weigh as B devices of
    batch 1 do, whatever their lengths (a frame-weighted mean would weigh a longer row more)."""
    per_frame = (pred.float() - target.float()).pow(2).flatten(2).mean(-1)  # [B, F]
    mask = frame_mask.float()
    per_row = (per_frame * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return per_row.sum() / max(per_row.shape[0], 1)  # a 0-row batch: 0, still part of the graph


def next_clip_loss(model, batch: Batch, cfg: ObjectiveConfig, row_seeds: list[int], forward=None) -> torch.Tensor:
    """One training loss for a batch.

    `model` is the plain VideoGPT (config, sequence tables); `forward` is what
    runs it, the DeepSpeed engine wrapping it in distributed runs (default: the model).
    """
    x = batch.latents
    validate_clips(batch.clips, x.shape[1], x.shape[2], model.cfg.latent_channels, moments=batch.moments)
    noised = add_noise(batch, cfg, row_seeds)
    seq = model.sequence(batch.clips, tuple(x.shape[-2:]))
    pred = (forward or model)(noised.x_noisy, noised.x_clean, noised.t, seq)
    return masked_frame_mse(pred, noised.x1, noised.frame_mask)
