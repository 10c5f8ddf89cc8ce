"""Video in, video out: the inference pipeline around the sampler.

Frames are taken as the training latents were made (`Recipe`: the VAE, resize/crop,
frame stride and frame interval the export's dataset recorded), encoded, continued by
the next-clip sampler, decoded, scored and written per video (prediction.mp4,
frames.npz, strip.png, metrics.json, metrics.png; summary.json for the set).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.shard_format import get_fs
from data.synthetic.videos import write_video
from data.vae import LatentVae
from data.video import VideoRejected, decode_video, to_uint8
from jobconfig.errors import ConfigError
from jobconfig.loader import from_dict
from jobconfig.precompute import VaeConfig, VideoConfig
from jobconfig.predict import PredictConfig
from pretrain.checkpoint.export import load_exported_model
from pretrain.evaluation.figures import plot_per_frame, write_strip
from pretrain.evaluation.metrics import fvd, load_i3d, to_unit
from pretrain.evaluation.scoring import score
from pretrain.inference.sampler import NextClipPredictor


@dataclass
class Recipe:
    """How the training latents were made; inference must make its context the same way."""
    vae: VaeConfig
    video: VideoConfig
    frame_interval: int


def resolve_recipe(export_meta: dict, vae: str | None = None, frame_interval: int | None = None,
                   max_image_size: int | None = None) -> Recipe:
    vae_cfg, video_cfg = VaeConfig(), VideoConfig()
    root = export_meta.get("data_root")
    if root:
        fs, path = get_fs(root, export_meta.get("data_storage_options") or {})
        try:
            plan = json.loads(fs.cat_file(f"{path}/plan.json"))
            vae_cfg = from_dict(VaeConfig, plan["config"]["vae"], "plan.json: vae")
            video_cfg = from_dict(VideoConfig, plan["config"]["video"], "plan.json: video")
        except FileNotFoundError:
            if vae is None:
                raise ConfigError(f"the export was trained on {root}, whose plan.json is gone; "
                                  "pass --vae (and --max-image-size, --frame-interval) explicitly") from None
    elif vae is None:
        raise ConfigError("the export does not record its dataset (trained on synthetic latents?): "
                          "pass --vae PATH (a diffusers AutoencoderKL directory, or 'tiny')")
    if vae is not None:
        vae_cfg.path = vae
    if max_image_size is not None:
        video_cfg.max_image_size = max_image_size
    # prediction judges whatever it is given: the farm's length and size rules do not apply
    video_cfg.min_frames, video_cfg.max_frames, video_cfg.min_side = 1, 0, 16
    vae_cfg.device = "auto"
    interval = frame_interval or int(export_meta.get("frame_interval") or 1)
    if interval < 1:
        raise ConfigError(f"--frame-interval: got {interval}, expected a positive integer")
    return Recipe(vae_cfg, video_cfg, interval)


def take_frames(uri: str, recipe: Recipe, context: int, generate: int, start: int = 0):
    """(context frames, ground-truth frames or fewer/none), uint8 [T, H, W, 3], at the recipe's interval."""

    # decode no further than the last frame used: a long video costs only its needed prefix
    needed = start + (context + generate - 1) * recipe.frame_interval + 1
    try:
        video = decode_video(uri, dataclasses.replace(recipe.video, max_frames=needed))
    except VideoRejected as e:
        raise ConfigError(f"--video {uri}: {e.reason}") from None
    frames = video.frames[start::recipe.frame_interval]
    if len(frames) < context:
        raise ConfigError(f"--video {uri}: {len(video.frames)} frames after sampling (stride {recipe.video.stride}), "
                          f"{len(frames)} of them at frame interval {recipe.frame_interval} from frame {start}; "
                          f"--context {context} needs at least {context} "
                          f"({(context - 1) * recipe.frame_interval + 1 + start} sampled frames)")
    return frames[:context], frames[context:context + generate], video.fps / recipe.frame_interval


class VideoPredictor:
    """Model + VAE + recipe: uint8 context frames -> uint8 predicted frames, and scores."""

    def __init__(self, checkpoint: str | Path, cfg: PredictConfig, recipe: Recipe, model_cfg=None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_exported_model(checkpoint, device=device, expect=model_cfg)
        self.vae = LatentVae(recipe.vae, device=device)
        if self.vae.latent_channels != self.model.cfg.latent_channels:
            raise ConfigError(f"VAE {recipe.vae.path!r} has {self.vae.latent_channels} latent channels, but the "
                              f"export {checkpoint} was trained on {self.model.cfg.latent_channels}")
        self.cfg, self.recipe = cfg, recipe
        self.predictor = NextClipPredictor(self.model, cfg)

    def encode(self, frames: np.ndarray, key: str) -> torch.Tensor:
        return self.vae.encode(frames, key=key)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae.decode(latents))

    def predict(self, context: np.ndarray, generate: int, key: str) -> np.ndarray:
        return self.decode(self.predictor.predict(self.encode(context, key), generate))


def write_outputs(out: Path, context: np.ndarray, pred: np.ndarray, truth: np.ndarray, fps: float,
                  metrics: dict) -> None:

    out.mkdir(parents=True, exist_ok=True)
    write_video(out / "prediction.mp4", np.concatenate([context, pred]), fps=max(1, round(fps)))
    np.savez_compressed(out / "frames.npz", context=context, prediction=pred, truth=truth)  # exact uint8 frames
    rows = [("context", context[-8:]), ("prediction", pred)] + ([("ground truth", truth)] if len(truth) else [])
    write_strip(rows, out / "strip.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if "psnr" in metrics:
        plot_per_frame({"prediction": metrics["psnr"],
                        "repeat last frame": metrics["baseline_repeat_last"]["psnr"]},
                       "PSNR (dB)", out / "metrics.png", title=metrics.get("video", ""))


def predict_videos(checkpoint: str | Path, videos: list[str], context: int, generate: int, out: Path,
                   cfg: PredictConfig, recipe: Recipe, model_cfg=None, start: int = 0) -> dict:
    """Predict and score every video; per-video outputs under out/<name>/, summary.json in out/."""

    runner = VideoPredictor(checkpoint, cfg, recipe, model_cfg)
    clips = [take_frames(v, recipe, context, generate, start) for v in videos]  # all inputs checked first
    per_video, real, fake = [], [], []
    t0 = time.perf_counter()
    for i, (uri, (ctx, truth, fps)) in enumerate(zip(videos, clips)):
        name = Path(uri.rstrip("/")).stem
        pred = runner.predict(ctx, generate, key=name)
        metrics = {"video": uri, "context": context, "generate": generate, **score(pred, ctx, truth)}
        write_outputs(out / name, ctx, pred, truth, fps, metrics)
        per_video.append(metrics)
        if len(truth) == generate:
            real.append(to_unit(np.concatenate([ctx, truth])))
            fake.append(to_unit(np.concatenate([ctx, pred])))
        done = i + 1
        eta = (time.perf_counter() - t0) / done * (len(videos) - done)
        shown = f"PSNR {metrics['mean_psnr']:.2f} dB (repeat-last {metrics['baseline_repeat_last']['mean_psnr']:.2f})" \
            if "mean_psnr" in metrics else "no ground truth"
        print(f"[predict] {done}/{len(videos)} {name}: {shown}  ETA {eta:.0f}s", flush=True)
    scored = [m for m in per_video if "mean_psnr" in m]
    summary = {"checkpoint": str(checkpoint), "videos": len(videos), "context": context, "generate": generate,
               "predict": dataclasses.asdict(cfg), "per_video": per_video}
    if scored:
        summary["mean_psnr"] = float(np.mean([m["mean_psnr"] for m in scored]))
        summary["mean_ssim"] = float(np.mean([m["mean_ssim"] for m in scored]))
        summary["baseline_repeat_last_mean_psnr"] = float(np.mean(
            [m["baseline_repeat_last"]["mean_psnr"] for m in scored]))
        summary["baseline_repeat_last_mean_ssim"] = float(np.mean(
            [m["baseline_repeat_last"]["mean_ssim"] for m in scored]))
    if cfg.i3d_path and len(real) >= 2:
        summary["fvd"] = fvd(load_i3d(cfg.i3d_path), real, fake)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
