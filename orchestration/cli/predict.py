"""`vgpt predict`: continue real videos with a trained export, and score the continuation.

    vgpt predict --checkpoint runs/pretrain/stage4/export
        --video clip.mp4 [more.mp4 s3://bucket/x.mp4 ...] [--context 56] [--generate 48] [--out predictions]

Frames are taken as the training latents were made: the export records the
dataset it was trained on, whose plan.json holds the precompute recipe (VAE,
resize/crop, frame stride), and the stage's frame interval. `--vae`,
`--frame-interval` and `--max-image-size` override it (needed for exports
trained on synthetic latents). The context is encoded with that VAE, the next
`--generate` frames are predicted (pretrain/inference/sampler.py: Euler steps, image
guidance, sliding window, KV cache; `--predict.*` overrides), decoded, and
written per video. Generation follows the authors' pipeline (METHOD.md, Inference):
before each clip after the first the whole history, the given context too, is decoded
to uint8 and re-encoded with a fresh posterior draw (`--predict.history=latent` keeps
the sampled latents instead: faster, a departure from the authors); the noise generator
is re-seeded with predict.seed for every clip (`--predict.noise_seed=per_clip`: a seed
per clip); on a GPU the model runs in bf16 (`--predict.dtype`), the VAE always in fp32.
Outputs per video: prediction.mp4 (context then prediction), frames.npz (the
same frames exactly, and the ground truth, as uint8 arrays), strip.png
(context | prediction | ground truth), metrics.json and metrics.png (PSNR
and SSIM per predicted frame against the ground truth when the video has it,
next to the "repeat the last context frame" baseline). With several videos
and `--predict.i3d_path`, summary.json also holds the FVD of the set.
"""
from __future__ import annotations

from pathlib import Path

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import load_config
from orchestration import preflight
from orchestration.cli import reports_bad_input, verb_parser
from pretrain.inference.pipeline import predict_videos, resolve_recipe


@reports_bad_input("predict")
def main(argv: list[str]) -> int:
    parser = verb_parser("predict", __doc__, JobConfig, only=("predict", "model"))
    parser.add_argument("--checkpoint", required=True, help="an export: a directory with config.json, e.g. "
                                                           "<out_dir>/export (or an older .safetensors file)")
    parser.add_argument("--video", required=True, nargs="+", help="video paths or fsspec URLs")
    # the reference's inference script: 56 clean context frames, two 24-frame clips (predict.clip_frames)
    parser.add_argument("--context", type=int, default=56, help="context frames (default 56, the reference's)")
    parser.add_argument("--generate", type=int, default=48,
                        help="frames to predict (default 48: two clips of predict.clip_frames=24)")
    parser.add_argument("--out", default="predictions", help="output directory (default predictions)")
    parser.add_argument("--start", type=int, default=0, help="first frame of the context (in sampled frames)")
    parser.add_argument("--config", default=None, help="a job YAML: its predict: section, and its model: "
                                                       "section is checked against the export")
    parser.add_argument("--vae", default=None, help="VAE to encode/decode with (default: the export's dataset recipe)")
    parser.add_argument("--frame-interval", type=int, default=None, help="take every N-th frame (default: the recipe's)")
    parser.add_argument("--max-image-size", type=int, default=None, help="long side after resize (default: the recipe's)")
    args, overrides = parser.parse_known_args(argv)
    if args.context < 1 or args.generate < 1:
        raise ConfigError(f"--context/--generate: got {args.context}/{args.generate}, expected positive integers")
    job = load_config(args.config, overrides)
    if args.frame_interval is not None and args.frame_interval < 1:
        raise ConfigError(f"--frame-interval: got {args.frame_interval}, expected >= 1")
    if args.max_image_size is not None and args.max_image_size < 1:
        raise ConfigError(f"--max-image-size: got {args.max_image_size}, expected >= 1")
    if args.start < 0:
        raise ConfigError(f"--start: got {args.start}, expected >= 0")
    # export file, videos and --out, before any model or VAE is loaded
    meta = preflight.check_predict(args.checkpoint, args.video, args.out)
    recipe = resolve_recipe(meta, args.vae, args.frame_interval, args.max_image_size)
    summary = predict_videos(args.checkpoint, args.video, args.context, args.generate, Path(args.out),
                             job.predict, recipe, model_cfg=job.model if args.config else None, start=args.start)
    if "mean_psnr" in summary:
        print(f"[predict] mean PSNR {summary['mean_psnr']:.2f} dB vs repeat-last-frame "
              f"{summary['baseline_repeat_last_mean_psnr']:.2f} dB; SSIM {summary['mean_ssim']:.3f} vs "
              f"{summary['baseline_repeat_last_mean_ssim']:.3f}; outputs in {args.out}/", flush=True)
    return 0
