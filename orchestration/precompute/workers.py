"""The Ray workers of the precompute farm: a decode task per video (CPU) and
encoder actors that hold the VAE (GPU where there is one, CPU otherwise).

A decode task returns two objects: a small status (kept by the driver) and the
uint8 frames (left in the object store and handed by reference to an encoder,
so the driver never copies pixels). The encoder returns the finished sample's
tar members (a few KB per frame of bf16 latents), which the driver collects
per shard. Rejections are values, not exceptions: Ray retries only real
failures (a worker that died, an I/O error), never a bad video.

Fault injection for tests: orchestration/faults.py (`worker_dies_once`).
"""
from __future__ import annotations

import os

import ray
import torch

from data.shard_format import encode_sample
from data.vae import LatentVae
from data.video import VideoRejected, decode_video
from jobconfig.precompute import VaeConfig, VideoConfig
from orchestration.faults import worker_dies_once


def decode(key: str, uri: str, cfg: VideoConfig, storage_options: dict):
    """-> (status, frames | None). status: {"key", "ok", "reason"|"fps", "frame_indices", "meta", "num_frames"}."""
    worker_dies_once("decode")
    try:
        video = decode_video(uri, cfg, storage_options)
    except VideoRejected as e:
        return {"key": key, "ok": False, "reason": e.reason}, None
    status = {"key": key, "ok": True, "fps": video.fps, "frame_indices": video.frame_indices,
              "meta": video.meta, "num_frames": int(video.frames.shape[0])}
    return status, video.frames


class Encoder:
    """Holds one VAE; turns decoded frames into a finished sample (latents + meta.json)."""

    def __init__(self, cfg: VaeConfig, latent_dtype: str):
        if cfg.device != "cuda" and not ray.get_gpu_ids():
            # Ray sets OMP threads from num_cpus; torch reads it only at import on some builds.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.vae = LatentVae(cfg)
        self.store_dtype = torch.bfloat16 if latent_dtype == "bf16" else torch.float16

    def identity(self) -> dict:
        return self.vae.identity

    def encode(self, status: dict, uri: str, frames) -> dict:
        worker_dies_once("encoder")
        key = status["key"]
        latents = self.vae.encode(frames, key).to(self.store_dtype)
        meta = {"key": key, "source": uri, "fps": status["fps"], "num_frames": int(latents.shape[0]),
                "frame_indices": status["frame_indices"], **status["meta"],
                "latent_shape": list(latents.shape), "latent_dtype": str(latents.dtype).replace("torch.", ""),
                "vae": self.vae.identity, "scaling_factor": self.vae.scaling_factor,
                "shift_factor": self.vae.shift_factor, "vae_sample": self.vae.cfg.sample}
        return {"key": key, "members": encode_sample(latents, meta), "frames": int(latents.shape[0]),
                "shape": list(latents.shape)}


def remote_decode(cfg_ray):
    return ray.remote(decode).options(num_cpus=cfg_ray.decode_cpus, num_returns=2,
                                      max_retries=cfg_ray.max_retries, retry_exceptions=[OSError])


def make_encoders(cfg_ray, vae_cfg: VaeConfig, latent_dtype: str) -> list:
    cls = ray.remote(Encoder).options(num_cpus=cfg_ray.encode_cpus, num_gpus=cfg_ray.encode_gpus,
                                      max_restarts=cfg_ray.max_retries, max_task_retries=cfg_ray.max_retries)
    return [cls.remote(vae_cfg, latent_dtype) for _ in range(cfg_ray.encode_actors)]
