"""The Ray workers of the precompute farm: a decode task per video segment (CPU)
and encoder actors that hold the VAE (GPU where there is one, CPU otherwise).

A decode task returns three objects: a small status (kept by the driver), the
uint8 frames of one segment (left in the object store of the node that decoded
them and handed by reference to an encoder, so the driver never copies pixels)
and, from a long video's first segment, its frame table (data/video.py), which
the later segments' tasks take instead of probing the file again. The encoder
returns the finished sample's tar members (a few KB per frame of bf16 latents:
the posterior's mean and std, or one draw, as `precompute.latents` says),
which the driver collects per shard. Rejections are values, not exceptions: Ray
retries only real failures (a worker or node that died, an I/O error), never a
bad video. Both report the node they ran on, for the driver's per-node count.

Fault injection for tests: orchestration/faults.py (`worker_dies_once`, `encoder_fails_to_start`).
"""
from __future__ import annotations

import os

import ray
import torch

from data.precompute_plan import segment_key
from data.shard_format import encode_sample
from data.vae import LatentVae
from data.video import FrameTable, VideoRejected, decode_segment
from jobconfig.precompute import PrecomputeRayConfig, VaeConfig, VideoConfig
from orchestration.faults import encoder_fails_to_start, worker_dies_once


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def decode(key: str, uri: str, cfg: VideoConfig, storage_options: dict, segment: int = 0,
           table: FrameTable | None = None, threads: int = 1):
    """-> (status, frames | None, table | None). status: {"key", "segment", "ok", "node", "reason" | "sample_key",
    "num_segments", "first_frame", "fps", "frame_indices", "meta", "num_frames"}."""
    worker_dies_once("decode")
    try:
        video = decode_segment(uri, cfg, storage_options, segment, table, threads)
    except VideoRejected as e:
        return {"key": key, "segment": segment, "ok": False, "reason": e.reason, "node": _node()}, None, None
    status = {"key": key, "segment": segment, "ok": True, "node": _node(),
              "sample_key": segment_key(key, segment, video.num_segments), "num_segments": video.num_segments,
              "first_frame": video.first_frame, "fps": video.fps, "frame_indices": video.frame_indices,
              "meta": video.meta, "num_frames": int(video.frames.shape[0])}
    return status, video.frames, video.table if segment == 0 and video.num_segments > 1 else None


class Encoder:
    """Holds one VAE; turns decoded frames into a finished sample (latents + meta.json)."""

    def __init__(self, cfg: VaeConfig, latent_dtype: str, latent_form: str = "posterior"):
        encoder_fails_to_start()
        if cfg.device != "cuda" and not ray.get_gpu_ids():
            # Ray sets OMP threads from num_cpus; torch reads it only at import on some builds.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.vae = LatentVae(cfg)
        self.store_dtype = torch.bfloat16 if latent_dtype == "bf16" else torch.float16
        self.latent_form = latent_form

    def identity(self) -> dict:
        return {**self.vae.identity, "node": _node()}

    def encode(self, status: dict, uri: str, frames) -> dict:
        worker_dies_once("encoder")
        key = status["sample_key"]
        # Seeds follow (input key, frame index in the input): a segment's latents are exactly the
        # frames' share of an unsegmented encode, however the video was cut. The posterior form has no seed.
        if self.latent_form == "posterior":
            latents = self.vae.moments(frames).to(self.store_dtype)
        else:
            latents = self.vae.encode(frames, status["key"], first_frame=status["first_frame"]).to(self.store_dtype)
        meta = {"key": key, "source": uri, "fps": status["fps"], "num_frames": int(latents.shape[0]),
                "frame_indices": status["frame_indices"], **status["meta"],
                "latent_shape": list(latents.shape), "latent_dtype": str(latents.dtype).replace("torch.", ""),
                "vae": self.vae.identity, "scaling_factor": self.vae.scaling_factor,
                "shift_factor": self.vae.shift_factor, "latent_form": self.latent_form,
                **({"vae_sample": self.vae.cfg.sample} if self.latent_form == "sample" else {})}
        if status["num_segments"] > 1:
            meta["source_key"] = status["key"]
        return {"key": key, "members": encode_sample(latents, meta), "frames": int(latents.shape[0]),
                "shape": list(latents.shape), "first_frame": status["first_frame"], "node": _node()}


def remote_decode(cfg_ray: PrecomputeRayConfig):
    """-> on(node): the decode task pinned to `node`, softly (it runs elsewhere if that node is gone)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(decode)
    opts = dict(num_cpus=cfg_ray.decode_cpus, num_returns=3, max_retries=cfg_ray.max_retries,
                retry_exceptions=[OSError], resources=dict(cfg_ray.decode_resources) or None)

    def on(node: str):
        return task.options(**opts, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
    return on


def decode_threads(cfg_ray: PrecomputeRayConfig) -> int:
    return cfg_ray.decode_threads or max(1, int(cfg_ray.decode_cpus))


def make_encoders(cfg_ray: PrecomputeRayConfig, vae_cfg: VaeConfig, latent_dtype: str,
                  latent_form: str = "posterior") -> list:
    # SPREAD: one node's loss takes as few encoders as possible; each is restarted where resources allow.
    cls = ray.remote(Encoder).options(num_cpus=cfg_ray.encode_cpus, num_gpus=cfg_ray.encode_gpus,
                                      resources=dict(cfg_ray.encode_resources) or None, scheduling_strategy="SPREAD",
                                      max_restarts=cfg_ray.max_retries, max_task_retries=cfg_ray.max_retries)
    return [cls.remote(vae_cfg, latent_dtype, latent_form) for _ in range(cfg_ray.encode_actors)]
