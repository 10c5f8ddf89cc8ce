"""The batch contract (loader -> objective) and its token count.

A batch row holds one or more *packed samples*; each sample is a list of clip
sizes in frames (`Batch.clips`: row -> samples -> clip sizes). A row's frames
are its samples' frames concatenated; rows shorter than the longest are
padded with frames that `Batch.frame_mask()` marks. How the model turns a row
into tokens lives with the model (pretrain/model/sequence.py); what the data
side needs of it is only the count, `sequence_length`: a noisy frame is
[marker][time][patches], a clean frame [<img>][patches][</img>] (both
patches + 2 tokens), and the last clip of a sample has no clean copy. The loader packs and filters by
that count, the trainer reports tokens/s with it.

Latent forms (index.json `latent_form`, data/shard_format.py): a dataset stores per frame either one
posterior draw (`sample`, C channels) or the VAE posterior's moments (`posterior`, 2C channels: the
scaled mean, then the scaled std). A batch of the second kind has `moments=True`; the objective
draws from it (pretrain/training/objective.py), readers that want one latent take the mean
(`posterior_mean`). The moments ride in the channel axis so that everything between the shard and
the objective (frame windows, packing, padding with zeros: mean 0 and std 0 give 0) is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from jobconfig.errors import ConfigError


def split_moments(latents: torch.Tensor, dim: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of posterior-form latents: the first and second half of the channel axis `dim`."""
    c = latents.shape[dim]
    if c % 2:
        raise ValueError(f"posterior-form latents: {c} channels, expected an even count (mean, then std)")
    return latents.narrow(dim, 0, c // 2), latents.narrow(dim, c // 2, c // 2)


def posterior_mean(latents: torch.Tensor, moments: bool, dim: int = -3) -> torch.Tensor:
    """The latents a reader that wants one value per frame uses: the posterior mean of moments, else as is."""
    return split_moments(latents, dim)[0] if moments else latents


@dataclass
class Batch:
    """What the loader gives the objective.

    latents: [B, F, C, h, w] clean latents; frames past a row's total are padding.
    clips:   row -> packed samples -> clip sizes (frames); sizes of a row sum to its frame count.
    keys / frame_interval: per row, per sample; provenance and stage metadata.
    moments: latents hold [mean, std] of the VAE posterior in 2C channels (keyword only, so that
             positional construction of Batch and its subclasses is unchanged).
    """
    latents: torch.Tensor
    clips: list[list[list[int]]]
    keys: list[list[str]] = field(default_factory=list)
    frame_interval: list[list[int]] = field(default_factory=list)
    moments: bool = field(default=False, kw_only=True)

    def frames_per_row(self) -> list[int]:
        return [sum(sum(s) for s in row) for row in self.clips]

    def frame_mask(self) -> torch.Tensor:
        """[B, F] bool: True for real frames."""
        counts = torch.tensor(self.frames_per_row())
        return torch.arange(self.latents.shape[1])[None, :] < counts[:, None]

    def to(self, device) -> "Batch":
        return Batch(self.latents.to(device), self.clips, self.keys, self.frame_interval, moments=self.moments)


def validate_clips(clips: list[list[list[int]]], num_frames: int, channels: int, expected_channels: int,
                   moments: bool = False) -> None:
    """`moments`: the latents hold the posterior's mean and std, 2 x model.latent_channels channels."""
    if moments and channels != 2 * expected_channels:
        raise ConfigError(f"latents: got {channels} channels of posterior moments, expected {2 * expected_channels} "
                          f"(mean and std of model.latent_channels={expected_channels})")
    if not moments and channels != expected_channels:
        raise ConfigError(f"latents: got {channels} channels, expected {expected_channels} (model.latent_channels)")
    for r, row in enumerate(clips):
        if not row:
            raise ConfigError(f"clips row {r}: no samples")
        for s, sizes in enumerate(row):
            if not sizes or any((not isinstance(c, int)) or c <= 0 for c in sizes):
                raise ConfigError(f"clips row {r} sample {s}: clip sizes {sizes} must be positive integers")
        total = sum(sum(s) for s in row)
        if total > num_frames:
            raise ConfigError(f"clips row {r}: clip sizes sum to {total} frames but latents hold only {num_frames}")
    if clips and max(sum(sum(s) for s in row) for row in clips) != num_frames:
        raise ConfigError(f"clips: clip sizes sum to {[sum(sum(s) for s in row) for row in clips]} frames "
                          f"per row, but the latents hold {num_frames} frames (no row uses them all)")


def sequence_length(clips_per_sample: list[list[int]], patches: int) -> int:
    """Tokens of one row: every frame copy is P + 2 tokens (marker and time before noisy patches,
    <img> and </img> around clean ones); the last clip has no clean copy."""
    total = 0
    for clips in clips_per_sample:
        frames = sum(clips)
        total += (2 * frames - clips[-1]) * (patches + 2)
    return total


def patches_per_frame(latent_hw: tuple[int, int], patch_size: int) -> int:
    """Patch tokens of one latent frame of size h x w (the model's patch grid, h/p x w/p)."""
    h, w = latent_hw
    return (h // patch_size) * (w // patch_size)
