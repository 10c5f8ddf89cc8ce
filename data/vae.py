"""The image VAE of METHOD.md as the farm uses it: diffusers `AutoencoderKL`
loaded from a local directory (the SDXL VAE in production; a tiny one for
tests and the quickstart, saved and loaded the same way).

latent = (posterior.sample() - shift_factor) * scaling_factor, frame by frame.
The posterior is sampled with one seed per (video key, frame index), drawn on
the CPU: the stored latents then do not depend on batch size, worker, device
or on which retry produced them, so a resumed job writes the same bytes as an
uninterrupted one. `sample: mode` (the posterior mean) is offered for
inspection and ablations.

`moments` gives the posterior itself instead (the `posterior` latent form, data/shard_format.py,
the precompute default): per frame the scaled mean (mean - shift_factor) * scaling_factor and the
scaled std std * scaling_factor, concatenated on the channel axis [T, 2C, h, w], so that a draw
mean + std * n at training time is exactly a scaled `posterior.sample()`. The spread is stored as
the std, not the log-variance: latents are stored in bf16, whose rounding error is relative (at
most 2^-8) at every magnitude, so a bf16 std is within 0.4% of the fp32 one however small it is,
while a bf16 log-variance has an absolute error growing with |log-variance| (at -20, up to 0.06:
3% of the std); and a draw needs no exp. (Stored in fp16, a std under 6e-5 loses precision: prefer bf16.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from data.video import to_model_input
from jobconfig.precompute import VaeConfig

TINY_VAE = "tiny"
TINY_VAE_VERSION = 2  # 2: the posterior of a trained VAE (TINY_LOGVAR)
# A trained VAE's posterior is nearly deterministic (KL weight ~1e-6): its spread is a small fraction
# of the means' (METHOD.md Latents). A random init is not: its log-variances are ~0, the spread of
# the (scaled) draws 4x that of the means, and training on fresh posterior draws would see mostly
# noise. The tiny VAE's log-variance is therefore this constant (std e^-5).
TINY_LOGVAR = -10.0


def tiny_vae_kwargs() -> dict:
    """A 4-level (8x downsampling), 4-channel AutoencoderKL small enough for CPU tests."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=128,
                scaling_factor=0.13025)


def tighten_posterior(vae) -> None:
    """Give a tiny `AutoencoderKL` (random, or fitted as a deterministic autoencoder by
    data/vae_fit.py, which never trains its log-variances) the near-deterministic posterior of a
    trained VAE: log-variance TINY_LOGVAR everywhere, from the second half of `quant_conv`."""
    if vae.quant_conv is None:
        raise ValueError("tiny VAE: no quant_conv, so no log-variance output to set")
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0.0
        vae.quant_conv.bias[c:] = TINY_LOGVAR


def save_tiny_vae(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Build the tiny VAE with a seeded init and `save_pretrained` it (atomically) to `directory`."""
    from diffusers import AutoencoderKL

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**{**tiny_vae_kwargs(), **overrides})
    tighten_posterior(vae)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-vae-", dir=directory.parent))
    vae.save_pretrained(tmp, safe_serialization=True)
    try:
        os.rename(tmp, directory)  # concurrent actors on one machine: first rename wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def resolve_vae_dir(path: str) -> Path:
    """'tiny' -> a cached tiny VAE dir (created on first use); anything else must be a local dir."""
    if path == TINY_VAE:
        cache = Path(os.environ.get("VGPT_CACHE", Path.home() / ".cache" / "vgpt"))
        return save_tiny_vae(cache / f"tiny-vae-v{TINY_VAE_VERSION}")
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"vae.path: {path!r} is not a diffusers AutoencoderKL directory "
                                "(expected config.json and diffusion_pytorch_model.safetensors in it)")
    return p


def vae_identity(directory: Path, name: str) -> dict:
    """Name plus a hash of the config and weights: index.json and meta.json record which VAE wrote them."""
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return {"name": name, "sha256": h.hexdigest()[:16]}


def vae_info(path: str) -> dict:
    """Identity and latent facts of the VAE at `path`, from its files only (no model built):
    what the driver writes into index.json and each encoder into meta.json."""
    directory = resolve_vae_dir(path)
    conf = json.loads((directory / "config.json").read_text())
    shift = conf.get("shift_factor")
    return {**vae_identity(directory, TINY_VAE if path == TINY_VAE else directory.name),
            "scaling_factor": float(conf.get("scaling_factor", 0.18215)),
            "shift_factor": float(shift) if shift is not None else 0.0,
            "latent_channels": int(conf.get("latent_channels", 4)),
            "downsample": 2 ** (len(conf.get("block_out_channels", [0] * 4)) - 1)}


def frame_seed(base: int, key: str, frame_index: int) -> int:
    digest = hashlib.sha256(f"{base}:{key}:{frame_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LatentVae:
    """Encode uint8 frames to scaled latents in batches; decode latents back for inspection."""

    def __init__(self, cfg: VaeConfig, device: str | None = None):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        if device is None:
            device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        directory = resolve_vae_dir(cfg.path)
        self.identity = vae_info(cfg.path)
        self.vae = AutoencoderKL.from_pretrained(directory, torch_dtype=self.dtype, low_cpu_mem_usage=False)
        self.vae = self.vae.to(self.device).eval()
        self.scaling_factor = self.identity["scaling_factor"]
        self.shift_factor = self.identity["shift_factor"]
        self.latent_channels = self.identity["latent_channels"]
        self.downsample = self.identity["downsample"]

    def _posteriors(self, frames: np.ndarray | torch.Tensor):
        """(first frame, unscaled mean, unscaled std), fp32 on the CPU, per encoder batch."""
        x = to_model_input(frames)
        for start in range(0, x.shape[0], self.cfg.batch_size):
            batch = x[start:start + self.cfg.batch_size].to(self.device, self.dtype)
            dist = self.vae.encode(batch).latent_dist
            yield start, dist.mean.float().cpu(), dist.std.float().cpu()

    @torch.inference_mode()
    def moments(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 2C, H/8, W/8]: the scaled posterior mean, then its scaled std."""
        return torch.cat([torch.cat([(mean - self.shift_factor) * self.scaling_factor, std * self.scaling_factor], 1)
                          for _, mean, std in self._posteriors(frames)])

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, key: str, first_frame: int = 0) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 latents [T, C, H/8, W/8], scaled and shifted (METHOD.md)."""
        out = []
        for start, mean, std in self._posteriors(frames):
            if self.cfg.sample == "sample":
                noise = torch.stack([
                    torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
                        frame_seed(self.cfg.seed, key, first_frame + start + i)))
                    for i in range(mean.shape[0])])
                z = mean + std * noise
            else:
                z = mean
            out.append((z - self.shift_factor) * self.scaling_factor)
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [T, C, h, w] -> frames float32 [T, 3, H, W] in [-1, 1]."""
        out = []
        for start in range(0, latents.shape[0], self.cfg.batch_size):
            z = latents[start:start + self.cfg.batch_size].float() / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(z.to(self.device, self.dtype)).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)
