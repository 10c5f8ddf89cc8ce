"""A small latent dataset made from real mp4 files, in this process: what the example sweep's end-to-end
run trains on (tests/test_sweep.py).

The videos are written with PyAV (data/synthetic/videos.py: drifting gradients and a moving square),
then each goes through the functions a precompute worker runs (orchestration/precompute/workers.py):
`decode_segment` (probe, sample, resize, crop), the tiny VAE's `encode`, `encode_sample`; the shards
are committed and the index published as the precompute driver does (`commit_shard`, `write_index`).
Only Ray is left out: a precompute job would start one more Ray, on 2 cores, for a minute of work this
process does in seconds. One sample per video (no segments), so no held-out sample shares a video
with a trained one.

The VAE is the tiny one (data/vae.py, its seeded init) with the scale and shift a real VAE is given:
those that bring its latents of these videos to mean 0 and variance 1 (measured: the default tiny VAE's
scaled latents have std 0.035, too small for the losses of a sweep to tell model sizes apart), and its
posterior mean (`vae.sample: mode`): an untrained encoder's posterior std is about 1 in every channel,
so a draw would be noise that no model predicts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data.dataset_index import write_index
from data.shard_format import build_tar, commit_shard, encode_sample, get_fs, shard_stem
from data.synthetic.videos import bouncing_square_frames, write_video
from data.vae import LatentVae, save_tiny_vae
from data.video import decode_segment
from jobconfig.precompute import VaeConfig, VideoConfig

# 64 x 64 sources resized to 32 x 32: 4 x 4 latents of the tiny VAE (8x downsampling, 4 channels)
VIDEO = VideoConfig(max_image_size=32, min_side=32, min_frames=4)
SIZE, FPS = 64, 8
SCALE, SHIFT = 3.7, -0.03  # unit variance, zero mean of these videos' latents (measured; see above)


def write_video_latents(root: Path, videos: Path, num_videos: int, frames: int = 5, shard_size: int = 64) -> list[str]:
    """`num_videos` mp4 files of `frames` frames under `videos`, encoded into a latent dataset at `root`
    (bf16 latents [frames, 4, 4, 4], keys vid0000, vid0001, ...); returns the keys."""
    videos.mkdir(parents=True, exist_ok=True)
    vae_dir = save_tiny_vae(Path(root).parent / "tiny-vae-unit", scaling_factor=SCALE, shift_factor=SHIFT)
    vae = LatentVae(VaeConfig(path=str(vae_dir), sample="mode", batch_size=64, device="cpu"))
    fs, path = get_fs(str(root))
    fs.makedirs(path, exist_ok=True)
    manifests, keys = {}, []
    for s, lo in enumerate(range(0, num_videos, shard_size)):
        samples, shapes = [], []
        for v in range(lo, min(lo + shard_size, num_videos)):
            key = f"vid{v:04d}"
            uri = str(write_video(videos / f"{key}.mp4", bouncing_square_frames(SIZE, frames, seed=v), FPS))
            video = decode_segment(uri, VIDEO)
            latents = vae.encode(video.frames, key, first_frame=video.first_frame).to(torch.bfloat16)
            meta = {"key": key, "source": uri, "fps": video.fps, "num_frames": int(latents.shape[0]),
                    "frame_indices": video.frame_indices, **video.meta, "latent_shape": list(latents.shape),
                    "latent_dtype": "bfloat16", "vae": vae.identity, "scaling_factor": vae.scaling_factor,
                    "shift_factor": vae.shift_factor, "vae_sample": vae.cfg.sample}
            samples.append((key, encode_sample(latents, meta)))
            shapes.append(list(latents.shape))
        stem = shard_stem("train", s)
        manifests[stem] = commit_shard(fs, path, stem, build_tar(samples), [k for k, _ in samples],
                                       sum(sh[0] for sh in shapes), shapes)
        keys += [k for k, _ in samples]
    info = vae.identity
    write_index(fs, path, manifests, vae=info, latent_channels=vae.latent_channels, downsample=vae.downsample,
                latent_layout="TCHW", latent_form="sample", latent_dtype="bfloat16")
    return keys
