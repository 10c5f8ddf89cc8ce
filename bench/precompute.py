"""Bench of the latent-precompute farm: pipeline efficiency and worker scaling.

    python bench/precompute.py [--vae tiny|sdxl-shape] [--videos 12] [--frames 24]

Prints, from one run on this machine:
- bare: frames/s of a plain loop of the same VAE (same batch size, one thread,
  like one encoder actor) over the same frames, decoded beforehand in this
  process: the ceiling of one encoder;
- job(1 worker), job(2 workers): frames/s of the whole job (`precompute_job.run`:
  plan, encoder start-up and VAE load, decode, encode, commit, index) on a
  local Ray started beforehand, excluding only Ray's own start; and the same
  counted from when the encoders are up (the steady rate a long job sees);
- efficiency = job(1) / bare (goal >= 0.85) and scaling = job(2) / job(1).
`sdxl-shape` is the SDXL VAE architecture with random weights (no download):
the encode cost of production, at a smaller frame size to keep the bench short.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic.videos import pattern_frames, write_video  # noqa: E402
from jobconfig.precompute import (
    InputsConfig,
    OutputConfig,
    PrecomputeConfig,
    PrecomputeRayConfig,
    VaeConfig,
    VideoConfig,
)

SIZES = [(256, 144), (224, 128), (192, 144), (160, 128)]


def sdxl_shape_vae(directory: Path) -> Path:
    from diffusers import AutoencoderKL

    if not (directory / "config.json").exists():
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
        vae.save_pretrained(directory)
    return directory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", default="tiny", choices=["tiny", "sdxl-shape"])
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--max-image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vgpt-bench-"))
    os.environ.setdefault("VGPT_CACHE", str(tmp / "cache"))
    # One box: keep Ray on loopback and its token auth off (nothing else can reach it).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    vae_path = "tiny" if args.vae == "tiny" else str(sdxl_shape_vae(tmp / "sdxl-shape"))

    videos = tmp / "videos"
    videos.mkdir()
    for i in range(args.videos):
        w, h = SIZES[i % len(SIZES)]
        write_video(videos / f"v{i:03d}.mp4", pattern_frames(w, h, args.frames, seed=i), fps=24 + i % 7)

    video_cfg = VideoConfig(max_image_size=args.max_image_size, min_frames=4)
    vae_cfg = VaeConfig(path=vae_path, batch_size=args.batch_size)

    # Bare loop: one process, one thread (one encoder actor gets 1 CPU), frames decoded beforehand.
    import torch

    from data.vae import LatentVae
    from data.video import decode_video
    from orchestration.precompute.job import run

    decoded = [(p.stem, decode_video(str(p), video_cfg).frames) for p in sorted(videos.glob("*.mp4"))]
    vae = LatentVae(vae_cfg)
    vae.encode(decoded[0][1][:2], "warm-up")

    def bare_loop() -> tuple[int, float]:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        n = sum(vae.encode(f, key).shape[0] for key, f in decoded)
        torch.set_num_threads(os.cpu_count() or 1)
        return n, n / (time.perf_counter() - t0)

    frames, bare_before = bare_loop()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    for workers in (1, 2):
        # 2 cores: 1 worker = 1 CPU encoder + 1 CPU decode; 2 workers split the same 2 CPUs.
        cpus = 1.0 if workers == 1 else 0.5
        cfg = PrecomputeConfig(
            inputs=InputsConfig(dir=str(videos)),
            output=OutputConfig(root=str(tmp / f"out-{workers}"), videos_per_shard=4),
            video=video_cfg, vae=vae_cfg, progress_every_s=1e9,
            ray=PrecomputeRayConfig(encode_actors=workers, encode_cpus=cpus, decode_cpus=cpus,
                          decode_in_flight=2 + 2 * workers))
        t0 = time.perf_counter()
        summary = run(cfg)
        whole = summary["frames"] / (time.perf_counter() - t0)
        results[workers] = (whole, summary["frames_per_s"])
        assert summary["frames"] == frames, (summary, frames)
    ray.shutdown()
    # The box is shared: the bare loop runs before and after the jobs; the faster one is the ceiling.
    bare = max(bare_before, bare_loop()[1])

    print(f"\nbench/precompute.py: vae={args.vae} videos={args.videos} frames/video={args.frames} "
          f"max_image_size={args.max_image_size} batch={args.batch_size} cpus={os.cpu_count()} "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  bare VAE loop (1 thread, pre-decoded): {bare:8.1f} frames/s")
    for w in (1, 2):
        print(f"  job, {w} worker(s): whole job {results[w][0]:8.1f} frames/s; "
              f"after encoder start-up {results[w][1]:8.1f} frames/s")
    print(f"  pipeline efficiency job(1)/bare: whole job {results[1][0] / bare:5.2f}; "
          f"after start-up {results[1][1] / bare:5.2f}   (goal >= 0.85)")
    print(f"  scaling job(2)/job(1):           whole job {results[2][0] / results[1][0]:5.2f}; "
          f"after start-up {results[2][1] / results[1][1]:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
