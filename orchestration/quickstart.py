"""`vgpt quickstart`: the whole system on one CPU box, from videos to predicted frames.

    vgpt quickstart [--workdir runs/quickstart] [--reduced] [--nproc 1]

1. writes synthetic videos (a square bouncing at constant velocity) as real
   mp4 files with PyAV: a training set and held-out videos;
2. fits the tiny VAE on frames of the training videos for a few hundred steps,
   so that decoded latents are recognisable pictures (data/vae_fit.py);
3. runs the latent-precompute job (`vgpt precompute`, a local Ray) over the
   training videos into WebDataset shards, and over the held-out videos into a
   dataset of their own (stage 1's held-out loss: `eval.root`);
4. trains the four curriculum stages of configs/quickstart.yaml with the debug
   model through the DeepSpeed engine on CPU (`vgpt train`), each stage
   starting from the previous one's export;
5. predicts the held-out videos from their first frames (`vgpt predict`'s
   code: 50 Euler steps, image guidance 1.5, KV cache) and scores them
   against the ground truth and the repeat-the-last-frame baseline;
6. writes <workdir>/report/: loss.png (all stages, and stage 1's held-out
   loss: configs/quickstart.yaml evaluates it every 25 steps, and predicts two
   held-out videos every 75 into train/stage1/predictions/ and TensorBoard),
   strip.png (context | prediction | truth), metrics.json, summary.txt, and
   prints the summary.

Every step skips work that is already done (videos on disk, a fitted VAE, a
committed dataset, finished stages, checkpoints inside a stage), so a re-run
after an interruption resumes. Steps 3 and 4 run as the same commands a user
would type, in subprocesses, so Ray and the process group live and die with
their step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.synthetic.videos import bouncing_square_frames, write_video
from data.vae_fit import fit_tiny_vae, fitted_stats
from data.video import decode_video
from jobconfig.curriculum import plan_stages
from jobconfig.loader import CONFIG_ROOT
from jobconfig.precompute import VideoConfig
from pretrain.checkpoint.export import export_exists, export_path, read_export_metadata
from pretrain.evaluation.figures import plot_loss_curves, read_heldout_curve, read_loss_curve, write_strip
from pretrain.inference.pipeline import predict_videos, resolve_recipe
from pretrain.training.metric_sinks import METRICS_FILE

VIDEO_SIZE, VIDEO_FRAMES, FPS = 64, 40, 8


@dataclass
class Scale:
    train_videos: int = 48
    heldout_videos: int = 6
    vae_steps: int = 500
    stage_steps: int = 0  # > 0: every stage trains this many steps instead of configs/quickstart.yaml's
    context: int = 4
    generate: int = 6


FULL = Scale()
REDUCED = Scale(train_videos=24, heldout_videos=6, vae_steps=250, stage_steps=150, generate=3)


def log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def make_videos(folder: Path, count: int, first_seed: int) -> list[Path]:

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"square-{first_seed + i:04d}.mp4"
        if not path.is_file():
            tmp = path.with_name(f".{path.stem}.tmp.mp4")
            write_video(tmp, bouncing_square_frames(VIDEO_SIZE, VIDEO_FRAMES, seed=first_seed + i), fps=FPS)
            tmp.replace(path)  # a video is either complete or absent
        paths.append(path)
    return paths


def fit_vae(videos: list[Path], directory: Path, steps: int) -> dict:
    if (stats := fitted_stats(directory)) is not None:  # before decoding any frame for it
        return stats
    cfg = VideoConfig(max_image_size=VIDEO_SIZE, min_side=16, min_frames=1)
    frames = np.concatenate([decode_video(str(v), cfg).frames[::2] for v in videos])
    return fit_tiny_vae(frames, directory, steps=steps)


def run_command(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "orchestration.cli", *args]
    log(f"{what}: {' '.join(['vgpt', *args])}")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}); re-run `vgpt quickstart` to resume from here")


def precompute(videos_dir: Path, vae_dir: Path, latents: Path) -> None:
    if (latents / "index.json").is_file():
        log(f"step 3/6: dataset already committed at {latents} (index.json); nothing to encode")
        return
    run_command(["precompute", "--config", str(CONFIG_ROOT / "precompute" / "tiny.yaml"),
                 f"--precompute.inputs.dir={videos_dir}", f"--precompute.output.root={latents}",
                 f"--precompute.vae.path={vae_dir}", "--precompute.vae.sample=mode",
                 f"--precompute.video.max_image_size={VIDEO_SIZE}", "--precompute.video.min_side=16",
                 "--precompute.output.videos_per_shard=8", "--precompute.progress_every_s=10"],
                f"step 3/6: latent precompute of {videos_dir.name} videos on a local Ray")


def train_overrides(latents: Path, heldout_latents: Path, out: Path, scale: Scale) -> list[str]:
    over = [f"--data.root={latents}", f"--eval.root={heldout_latents}", f"--train.out_dir={out}"]
    if scale.stage_steps:
        over += [f"--train.steps={scale.stage_steps}", f"--train.checkpoint_every={max(1, scale.stage_steps // 2)}"]
    return over


def report(workdir: Path, out: Path, summary: dict, vae_stats: dict, scale: Scale, timings: dict) -> dict:
    rep = workdir / "report"
    rep.mkdir(parents=True, exist_ok=True)
    curves = {f"stage{i}": read_loss_curve(out / f"stage{i}" / METRICS_FILE) for i in range(1, 5)
              if (out / f"stage{i}" / METRICS_FILE).is_file()}
    evals = {name: read_heldout_curve(out / name / METRICS_FILE) for name in curves}
    evals = {name: e for name, e in evals.items() if e}
    plot_loss_curves(curves, rep / "loss.png",
                     {name: {s: v["heldout_loss"] for s, v in e.items()} for name, e in evals.items()})
    shares = {name: [json.loads(x) for x in (out / name / METRICS_FILE).read_text().splitlines()
                     if "eval_time_share" in x][-1]["eval_time_share"] for name in evals}
    rows = []
    for m in summary["per_video"][:4]:
        name = Path(m["video"]).stem
        rows += _strip_rows(rep / "predictions" / name, name)
    write_strip(rows, rep / "strip.png")
    stages = {name: {"steps": max(c), "first_loss": c[min(c)], "last_loss": c[max(c)]}
              for name, c in curves.items() if c}
    beats = summary["mean_psnr"] > summary["baseline_repeat_last_mean_psnr"]
    metrics = {"heldout": {k: v for k, v in summary.items() if k != "per_video"},
               "per_video": summary["per_video"], "stages": stages, "vae_fit": vae_stats,
               "scale": asdict(scale), "seconds": timings, "beats_repeat_last_baseline": beats,
               # held-out loss during training (eval.every): stage -> step -> losses; its share of the stage's time
               "heldout_eval": evals, "eval_time_share": shares}
    (rep / "metrics.json").write_text(json.dumps(metrics, indent=1))
    lines = [
        "Video-GPT quickstart",
        f"  videos: {scale.train_videos} training, {scale.heldout_videos} held-out ({VIDEO_SIZE}x{VIDEO_SIZE}, "
        f"{VIDEO_FRAMES} frames, mp4)",
        f"  tiny VAE fitted: reconstruction PSNR {vae_stats['recon_psnr_db']:.1f} dB",
        *(f"  {s}: loss {v['first_loss']:.3f} -> {v['last_loss']:.3f} in {v['steps']} steps" for s, v in stages.items()),
        *(f"  {s}: held-out loss {e[min(e)]['heldout_loss']:.3f} (step {min(e)}) -> {e[max(e)]['heldout_loss']:.3f} "
          f"(step {max(e)}), evaluation {100 * shares[s]:.1f}% of its time"
          for s, e in evals.items()),
        f"  held-out prediction ({summary['context']} context frames -> {summary['generate']} predicted):",
        f"    PSNR {summary['mean_psnr']:.2f} dB vs {summary['baseline_repeat_last_mean_psnr']:.2f} dB for repeating "
        f"the last context frame ({'better' if beats else 'NOT better'})",
        f"    SSIM {summary['mean_ssim']:.3f} vs {summary['baseline_repeat_last_mean_ssim']:.3f}",
        f"  report: {rep}/ (loss.png, strip.png, metrics.json, predictions/)",
        f"  time: {sum(timings.values()):.0f} s this run",
    ]
    (rep / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return metrics


def _strip_rows(folder: Path, name: str) -> list[tuple[str, np.ndarray]]:
    """Two rows per video, context then prediction, and context then the truth, from frames.npz."""
    with np.load(folder / "frames.npz") as f:
        context, pred, truth = f["context"], f["prediction"], f["truth"]
    return [(f"{name[-4:]} predicted", np.concatenate([context, pred])),
            (f"{name[-4:]} truth", np.concatenate([context, truth]))]


def run(workdir: Path, scale: Scale, nproc: int = 1) -> dict:
    workdir = workdir.resolve()
    t = {}
    t0 = time.perf_counter()
    log(f"work dir {workdir}; step 1/6: synthetic videos")
    train_videos = make_videos(workdir / "videos" / "train", scale.train_videos, first_seed=0)
    heldout = make_videos(workdir / "videos" / "heldout", scale.heldout_videos, first_seed=10_000)
    t["videos"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log("step 2/6: fit the tiny VAE on training frames")
    vae_dir = workdir / "vae"
    vae_stats = fit_vae(train_videos, vae_dir, scale.vae_steps)
    log(f"VAE reconstruction PSNR {vae_stats['recon_psnr_db']:.1f} dB")
    t["vae_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents, heldout_latents = workdir / "latents", workdir / "heldout_latents"
    precompute(workdir / "videos" / "train", vae_dir, latents)
    precompute(workdir / "videos" / "heldout", vae_dir, heldout_latents)  # stage 1's held-out loss (eval.root)
    t["precompute"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = workdir / "train"
    over = train_overrides(latents, heldout_latents, out, scale)
    if export_exists(export_path(out / "stage4")):
        log("step 4/6: all four stages are trained already")
    else:
        run_command(["train", "--config", str(CONFIG_ROOT / "quickstart.yaml"), "--resume", "auto",
                     *(["--nproc", str(nproc)] if nproc > 1 else []), *over],
                    "step 4/6: four curriculum stages (DeepSpeed, CPU)")
    t["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"step 5/6: predict {len(heldout)} held-out videos ({scale.context} context -> {scale.generate} frames)")
    export = export_path(out / "stage4")
    job = plan_stages(str(CONFIG_ROOT / "quickstart.yaml"), over, None)[-1][1]
    recipe = resolve_recipe(read_export_metadata(export))
    summary = predict_videos(export, [str(v) for v in heldout], scale.context, scale.generate,
                             workdir / "report" / "predictions", job.predict, recipe, model_cfg=job.model)
    t["predict"] = time.perf_counter() - t0
    log("step 6/6: report")
    return report(workdir, out, summary, vae_stats, scale, t)
