"""Fit the tiny VAE to a set of frames, briefly, so decoded latents look like the input.

A randomly initialised tiny `AutoencoderKL` encodes fine for plumbing tests, but
its decoder draws noise: predictions could not be looked at. The quickstart
fits it on its own synthetic frames first, as a deterministic autoencoder:
reconstruction MSE of the decoded posterior mean plus a small L2 penalty on
that mean (which keeps the latent scale bounded). Sampling the posterior
during a fit this short drowns the latents in the untrained posterior's unit
noise (the fit stalled at ~20 dB), so the quickstart precomputes with
`vae.sample: mode`. It then sets `scaling_factor` to 1/std of the fitted
latents, which is how the SD and SDXL VAEs chose theirs: the diffusion model
sees unit-variance latents. Its log-variances, which the fit never uses, are set to those of
a trained VAE (data/vae.py `tighten_posterior`), so the posterior-form shards hold a spread
of about 1% of the latents' instead of the untrained encoder's unit noise.

The result is an ordinary diffusers directory (`save_pretrained`, safetensors)
that the precompute farm loads like any other VAE. Deterministic in `seed`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.vae import tighten_posterior, tiny_vae_kwargs
from data.video import to_model_input


def fitted_stats(directory: str | Path) -> dict | None:
    """The stats of a VAE this module already fitted into `directory`, else None."""
    done = Path(directory) / "fit.json"
    return json.loads(done.read_text()) if done.is_file() else None


def fit_tiny_vae(frames: np.ndarray, directory: str | Path, steps: int = 300, batch_size: int = 16,
                 lr: float = 2e-3, latent_l2: float = 1e-6, seed: int = 0, log_every: int = 50) -> dict:
    """Fit on uint8 [N, H, W, 3] frames and save to `directory` (atomically). Returns fit stats.

    An existing fitted directory (its `fit.json` present) is kept: re-running is free.
    """
    from diffusers import AutoencoderKL

    directory = Path(directory)
    if (stats := fitted_stats(directory)) is not None:
        return stats
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**tiny_vae_kwargs())
        tighten_posterior(vae)  # untouched by the fit: the posterior-form shards' spread
        x_all = to_model_input(frames)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        vae.train()
        for step in range(1, steps + 1):
            x = x_all[torch.randint(0, len(x_all), (batch_size,), generator=g)]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mean).sample
            mse = (recon - x).pow(2).mean()
            loss = mse + latent_l2 * posterior.mean.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps:
                psnr = 10 * np.log10(4.0 / max(mse.item(), 1e-12))  # pixels span 2 in [-1, 1]
                eta = (time.perf_counter() - t0) / step * (steps - step)
                print(f"[vae-fit] step {step}/{steps}  mse {mse.item():.5f}  psnr {psnr:.1f} dB  ETA {eta:.0f}s",
                      flush=True)
        vae.eval()
        with torch.no_grad():
            means = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mean for i in range(0, len(x_all), 64)])
            recon = torch.cat([vae.decode(means[i:i + 64]).sample for i in range(0, len(means), 64)])
    mse = (recon.clamp(-1, 1) - x_all).pow(2).mean().item()
    stats = {"steps": steps, "frames": int(len(frames)), "recon_psnr_db": 10 * float(np.log10(4.0 / mse)),
             "latent_std": float(means.std()), "seconds": time.perf_counter() - t0, "seed": seed}
    vae.register_to_config(scaling_factor=1.0 / stats["latent_std"])
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vae-fit-", dir=directory.parent))
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / "fit.json").write_text(json.dumps(stats, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return stats
