"""Video in, video out: the inference pipeline around the sampler.

Frames are taken as the training latents were made (`Recipe`: the VAE, resize/crop,
frame stride and frame interval the export's dataset recorded), encoded, continued by
the next-clip sampler, decoded, scored and written per video (prediction.mp4,
frames.npz, strip.png, metrics.json, metrics.png; summary.json for the set).

As the reference's pipeline (LVM/pipeline.py) generates: with predict.history:
reencode (the default) the history is handed to the model between clips as the
reference hands it (`HistoryReencoder`: every frame decoded to uint8 once, the
window re-encoded with a fresh posterior draw before each clip); the model runs in
the dtype predict.dtype picks for the device (`compute_dtypes`: bf16 on a GPU), the
VAE in fp32 (the reference's, whatever encoder dtype the dataset's plan.json records).
tests/test_predict_reference.py runs the reference's own pipeline code next to this one.
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


def compute_dtypes(choice: str, device: str | torch.device) -> tuple[torch.dtype, str]:
    """(model dtype, VAE dtype as VaeConfig.dtype names it) for predict.dtype on `device`: `auto` is
    the reference's bf16 model on a GPU and fp32 on the CPU (bf16 matmuls there are slow and
    imprecise); the VAE is fp32 in every case, as the reference runs it."""
    if choice == "auto":
        choice = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return (torch.bfloat16 if choice == "bf16" else torch.float32), "fp32"


def reference_uint8(frames: torch.Tensor) -> np.ndarray:
    """float [T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3] as the reference turns decoded frames into
    images: (x / 2 + 1 / 2) clamped to [0, 1], times 255, truncated (not rounded, unlike to_uint8)."""
    return ((frames.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class HistoryReencoder:
    """The history between clips as the reference's pipeline makes it (a sampler `refresh`).

    Before clip k >= 1 the reference takes its list of output images (the context as decoded
    from the latents the first clip saw, then every generated frame, each decoded once, uint8,
    `reference_uint8`), keeps the newest that fit the window, crops them (a no-op here: decoded
    frames are the latent grid times 8, a multiple of 16, no larger than the frames the
    context came from) and encodes them again, each with a fresh posterior draw. The draws
    here come from LatentVae's per-(key, frame) seeds, the key naming the clip, so a run is
    reproducible; the reference draws from torch's global RNG.
    """

    def __init__(self, vae: LatentVae, key: str):
        self.vae, self.key = vae, key
        self.frames: dict[int, np.ndarray] = {}  # history index -> uint8 frame, decoded once
        self.decoded = self.encoded = 0          # frames through the decoder / the encoder

    def __call__(self, history: torch.Tensor, start: int, clip: int) -> torch.Tensor:
        first = max(start, max(self.frames, default=-1) + 1)  # decoded frames are a run ending at the newest
        if first < len(history):
            new = reference_uint8(self.vae.decode(history[first:].cpu()))
            self.frames.update(zip(range(first, len(history)), new))
            self.decoded += len(new)
        for i in [i for i in self.frames if i < start]:  # out of the window for good (it only moves on)
            del self.frames[i]
        window = np.stack([self.frames[i] for i in range(start, len(history))])
        self.encoded += len(window)
        return self.vae.encode(window, key=f"{self.key}@clip{clip}", first_frame=start)


class VideoPredictor:
    """Model + VAE + recipe: uint8 context frames -> uint8 predicted frames, and scores."""

    def __init__(self, checkpoint: str | Path, cfg: PredictConfig, recipe: Recipe, model_cfg=None,
                 device: str | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_dtype, vae_dtype = compute_dtypes(cfg.dtype, device)
        self.model = load_exported_model(checkpoint, device=device, expect=model_cfg).to(model_dtype)
        self.vae = LatentVae(dataclasses.replace(recipe.vae, dtype=vae_dtype), device=device)
        if self.vae.latent_channels != self.model.cfg.latent_channels:
            raise ConfigError(f"VAE {recipe.vae.path!r} has {self.vae.latent_channels} latent channels, but the "
                              f"export {checkpoint} was trained on {self.model.cfg.latent_channels}")
        self.cfg, self.recipe = cfg, recipe
        self.predictor = NextClipPredictor(self.model, cfg)
        self.last_history: HistoryReencoder | None = None

    def encode(self, frames: np.ndarray, key: str) -> torch.Tensor:
        return self.vae.encode(frames, key=key)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae.decode(latents))

    def predict_latents(self, context: np.ndarray, generate: int, key: str) -> torch.Tensor:
        """uint8 context frames -> the `generate` next latents (float32), the history as predict.history says."""
        refresh = HistoryReencoder(self.vae, key) if self.cfg.history == "reencode" else None
        self.last_history = refresh  # for inspection: the frames the last clip's history was encoded from
        return self.predictor.predict(self.encode(context, key), generate, refresh)

    def predict(self, context: np.ndarray, generate: int, key: str) -> np.ndarray:
        return self.decode(self.predict_latents(context, generate, key))


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
