"""Bench of the latent-precompute farm: decode speed, pipeline efficiency, worker and node scaling.

    python bench/precompute.py [--part all|decode|encode|nodes|forms] [--vae tiny|sdxl-shape|DIR] [--videos 12]
                               [--frames 24]
    python bench/precompute.py --part plan [--inputs 1000000] [--new 10000]

Prints, from one run on this machine:
- decode (part `decode`): frames/s of `data.video.decode_video` (decode + bicubic resize to 320 px
  + crop, uint8 RGB out) on a 1080p H.264 file, one FFmpeg thread (one core), against the `ffmpeg`
  command line on one thread decoding the same file to raw frames: scaled to the same size (like for
  like; goal >= 0.8) and unscaled yuv420p (pure decode); plus our decode with 2 threads;
- nodes (part `nodes`): the whole job on a 1-node Ray cluster (a head with 2 CPUs) against a 2-node
  one (a head and a second node with 1 CPU each; same total), both started here on loopback with
  `ray start`: on one box this measures what going multi-node costs, not scaling;
- bare: frames/s of a plain loop of the same VAE (same batch size, one thread,
  like one encoder actor) over the same frames, decoded beforehand in this
  process, making the job's default latents (the posterior form): the ceiling of one encoder;
- forms (part `forms`, and in `all`): the encoder's whole per-sample work (encode, cast to the stored
  bf16, safetensors bytes) in the `posterior` form (mean and std per frame) and the `sample` form
  (one draw), the two alternated, best of 3 each, in one thread: frames/s, stored bytes per frame,
  and the ratio posterior / sample (goal >= 0.9);
- job(1 worker), job(2 workers): frames/s of the whole job (`precompute_job.run`:
  plan, encoder start-up and VAE load, decode, encode, commit, index) on a
  local Ray started beforehand, excluding only Ray's own start; and the same
  counted from when the encoders are up (the steady rate a long job sees);
- efficiency = job(1) / bare (goal >= 0.85) and scaling = job(2) / job(1).
- plan (part `plan`, not in `all`): `vgpt precompute --plan-only` in its own process over a list
  file of `--inputs` URIs (an empty root: generation 1), then, with generation 1 pinned, over the
  same plus `--new` (a growth: reads generation 1's file back as digests): planning seconds, the
  driver's peak memory and its memory before listing, and bytes per input (goal: 1M under 30 s).
`sdxl-shape` is the SDXL VAE architecture with random weights (no download):
the encode cost of production, at a smaller frame size to keep the bench short. `--vae DIR` runs
a trained diffusers AutoencoderKL (SDXL's on a box that has it): part `forms` then also says how
the posterior's std compares with the bf16 rounding of its stored mean, which decides what the
posterior form adds over storing the mean.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import random_vae  # noqa: E402
from data.synthetic.videos import pattern_frames, write_video  # noqa: E402
from jobconfig.precompute import (
    InputsConfig,
    OutputConfig,
    PrecomputeConfig,
    PrecomputeRayConfig,
    VaeConfig,
    VideoConfig,
)
from orchestration.local_ray import SHARED_HOST_WORKER_PORTS  # noqa: E402

SIZES = [(256, 144), (224, 128), (192, 144), (160, 128)]


def sdxl_shape_vae(directory: Path) -> Path:
    if not (directory / "config.json").exists():
        random_vae("sdxl").save_pretrained(directory)
    return directory


def write_1080p(path: Path, frames: int, fps: int = 30) -> Path:
    """A 1080p H.264 file (x264, B-frames, 2 s GOP, like web video), frames made one at a time."""
    import numpy as np

    from data.synthetic.videos import write_video

    yy, xx = np.mgrid[0:1080, 0:1920].astype(np.float32)

    def frame(t: int) -> np.ndarray:
        img = np.empty((1080, 1920, 3), np.uint8)
        for c in range(3):
            img[..., c] = (127.5 + 60 * np.sin(xx / 240 + 0.15 * t + c) * np.cos(yy / 300 - 0.1 * t * c)).astype(np.uint8)
        img[(t * 13) % 800:(t * 13) % 800 + 200, (t * 29) % 1600:(t * 29) % 1600 + 300] = 235
        return img
    return write_video(path, (frame(t) for t in range(frames)), fps, codec="libx264",
                       options={"preset": "veryfast", "crf": "23", "g": str(2 * fps)})


def bench_decode(tmp: Path, frames: int, repeats: int = 3) -> None:
    import shutil
    import subprocess

    from data.video import decode_video

    src = write_1080p(tmp / "in1080.mp4", frames)
    cfg = VideoConfig(max_image_size=320, min_frames=1)
    w, h = decode_video(str(src), cfg, threads=1).meta["resized_size"]

    def best(fn) -> float:  # the box is shared: the fastest of a few runs is the machine's speed
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return frames / min(times)

    ours1 = best(lambda: decode_video(str(src), cfg, threads=1))
    ours2 = best(lambda: decode_video(str(src), cfg, threads=2))
    ffmpeg = shutil.which("ffmpeg")
    print(f"\nbench/precompute.py decode: 1920x1080 H.264, {frames} frames -> {w}x{h} rgb24; "
          f"cpus={os.cpu_count()} load average {os.getloadavg()[0]:.1f}")
    print(f"  decode_video, 1 thread:  {ours1:7.1f} frames/s")
    print(f"  decode_video, 2 threads: {ours2:7.1f} frames/s  ({ours2 / ours1:4.2f}x one thread)")
    if not ffmpeg:
        print("  ffmpeg command line not found (apt-get install ffmpeg): no reference figure")
        return

    def run_ffmpeg(*vf: str) -> None:
        subprocess.run([ffmpeg, "-v", "error", "-threads", "1", "-filter_threads", "1", "-i", str(src), *vf,
                        "-f", "rawvideo", "-"], stdout=subprocess.DEVNULL, check=True)

    scaled = best(lambda: run_ffmpeg("-vf", f"scale={w}:{h}:flags=bicubic", "-pix_fmt", "rgb24"))
    raw = best(lambda: run_ffmpeg("-pix_fmt", "yuv420p"))
    print(f"  ffmpeg -threads 1, scaled to {w}x{h} rgb24: {scaled:7.1f} frames/s   ours/ffmpeg {ours1 / scaled:4.2f}"
          "   (goal >= 0.8)")
    print(f"  ffmpeg -threads 1, 1080p yuv420p (no scaling): {raw:7.1f} frames/s   ours/ffmpeg {ours1 / raw:4.2f}")


def _ray_node(tmp: Path, name: str, cpus: int, head_port: int | None = None) -> tuple[subprocess.Popen, int]:
    """`ray start --block` on loopback in its own process group (ended by killpg, leaving other Rays alone)."""
    import json
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = head_port or free()
    cmd = ["ray", "start", "--block", "--node-ip-address", "127.0.0.2", "--num-cpus", str(cpus),
           "--resources", json.dumps({name: 1}), "--object-store-memory", str(200 << 20), "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free()), "--metrics-export-port", str(free()), *SHARED_HOST_WORKER_PORTS]
    # Each node a temp dir of its own, as on its own machine: a node that shares the head's would delete and
    # unpack again the job's working dir under the running driver (tests/precompute_harness.py RayNode).
    cmd += (["--address", f"127.0.0.2:{head_port}", "--temp-dir", tempfile.mkdtemp(prefix="r", dir=tmp)] if head_port
            else ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(tmp / "ray")])
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 forbids joining a head and, on, Ray rewrites the address 127.0.0.1
    # to the routable one: so every node listens on 127.0.0.2 (loopback, not rewritten).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if head_port is None else "1"}
    proc = subprocess.Popen(cmd, stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    return proc, port


def bench_nodes(tmp: Path, videos: Path, video_cfg: VideoConfig, vae_cfg: VaeConfig, frames: int) -> None:
    import signal

    import ray

    from orchestration.precompute.job import run

    rates = {}
    for nodes in (1, 2):
        head, port = _ray_node(tmp, f"bench_head{nodes}", 2 if nodes == 1 else 1)
        procs = [head]
        try:
            ray.init(address=f"127.0.0.2:{port}", log_to_driver=False)  # waits for the head (bounded by Ray)
            if nodes == 2:
                procs.append(_ray_node(tmp, "bench_node_b", 1, head_port=port)[0])
                for _ in range(240):  # bounded: until the second node has registered
                    if sum(1 for n in ray.nodes() if n["Alive"]) == 2:
                        break
                    time.sleep(0.5)
            cfg = PrecomputeConfig(
                inputs=InputsConfig(dir=str(videos)), video=video_cfg, vae=vae_cfg, progress_every_s=1e9,
                output=OutputConfig(root=str(tmp / f"out-nodes{nodes}"), videos_per_shard=4),
                ray=PrecomputeRayConfig(address=f"127.0.0.2:{port}", encode_actors=2, encode_cpus=0.5,
                                        decode_cpus=0.5, decode_in_flight=3))
            t0 = time.perf_counter()
            summary = run(cfg)
            assert summary["frames"] == frames, (summary, frames)
            rates[nodes] = (summary["frames"] / (time.perf_counter() - t0), summary["frames_per_s"],
                            sum(1 for r in summary["nodes"].values() if r["decoded"]))
        finally:
            ray.shutdown()
            for p in reversed(procs):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    print(f"\nbench/precompute.py nodes: {frames} frames, 2 encoders, same 2 logical CPUs in total; "
          f"load average {os.getloadavg()[0]:.1f}")
    for n in (1, 2):
        print(f"  {n} node(s) (decoded on {rates[n][2]}): whole job {rates[n][0]:7.1f} frames/s; "
              f"after encoder start-up {rates[n][1]:7.1f} frames/s")
    print(f"  2 nodes / 1 node: whole job {rates[2][0] / rates[1][0]:4.2f}; "
          f"after start-up {rates[2][1] / rates[1][1]:4.2f}")


def bench_forms(vae, decoded: list, args, repeats: int = 3) -> dict[str, float]:
    """frames/s of the encoder actor's per-sample work in each latent form (orchestration/precompute/
    workers.py Encoder.encode, without Ray): encode, cast to bf16, safetensors bytes. One thread."""
    import torch

    from data.shard_format import encode_sample

    work = {"posterior": lambda f, key: vae.moments(f), "sample": lambda f, key: vae.encode(f, key)}
    best = {form: 0.0 for form in work}
    nbytes = {}
    torch.set_num_threads(1)
    for _ in range(repeats):  # alternated: the box is shared, load changes during the run
        for form, fn in work.items():
            t0, frames, size = time.perf_counter(), 0, 0
            for key, f in decoded:
                members = encode_sample(fn(f, key).to(torch.bfloat16), {"key": key, "latent_form": form})
                frames += f.shape[0]
                size += len(members["latents.safetensors"])
            best[form] = max(best[form], frames / (time.perf_counter() - t0))
            nbytes[form] = size / frames
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"\nbench/precompute.py forms: vae={args.vae} videos={len(decoded)} max_image_size={args.max_image_size} "
          f"batch={args.batch_size}, encoder {vae.cfg.dtype}, stored bf16, 1 thread, best of {repeats}; load average "
          f"{os.getloadavg()[0]:.1f}")
    for form in work:
        print(f"  {form:9s}: {best[form]:8.1f} frames/s, {nbytes[form]:8.0f} stored bytes/frame")
    print(f"  ratio posterior / sample: {best['posterior'] / best['sample']:5.2f} frames/s (goal >= 0.9), "
          f"{nbytes['posterior'] / nbytes['sample']:4.2f}x the bytes")
    spread = posterior_spread(vae, decoded)
    print(f"  posterior std / half the bf16 spacing at its stored mean: median {spread.median():.3g}, above 1 for "
          f"{(spread > 1).float().mean():.1%} of elements (below 1, a 1-sigma draw is within the stored mean's "
          "rounding); meaningful for a trained VAE only (--vae DIR)")
    return best


def posterior_spread(vae, decoded: list):
    """Per latent element: the VAE posterior's std over half the bf16 spacing at its mean, as stored (a
    bf16 mean's rounding error is up to that half spacing)."""
    import torch

    from data.batch import split_moments

    out = []
    for _, f in decoded:
        mean, std = split_moments(vae.moments(f).float(), dim=1)
        half_step = torch.ldexp(torch.ones_like(mean), torch.frexp(mean.to(torch.bfloat16).float()).exponent - 9)
        out.append((std / half_step).flatten())
    return torch.cat(out)


def bench_plan(tmp: Path, inputs: int, new: int) -> None:
    import re
    import shutil

    from jobconfig.loader import load_config

    def list_file(n: int) -> Path:
        path = tmp / f"uris-{n}.txt"
        with open(path, "w") as f:
            f.writelines(f"s3://videos/raw/part-{i % 1000:04d}/clip_{i:08d}.mp4\n" for i in range(n))
        return path

    root = tmp / "plan-root"
    args = ["--precompute.inputs.dir=null", f"--precompute.output.root={root}",
            "--precompute.output.videos_per_shard=64"]

    def plan_only(path: Path) -> tuple[float, float, float, str]:
        out = subprocess.run([sys.executable, "-m", "orchestration.cli", "precompute", "--config",
                              "configs/precompute/tiny.yaml", "--plan-only", f"--precompute.inputs.list_file={path}",
                              *args], check=False, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        line = next((ln for ln in out.stdout.splitlines() if "plan only:" in ln), None)
        if out.returncode or line is None:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
        m = re.search(r"planned in ([\d.]+) s, driver peak memory (\d+) MB \((\d+) MB before", line)
        return float(m[1]), float(m[2]), float(m[3]), line

    first, grown = list_file(inputs), list_file(inputs + new)
    s1, peak1, base1, line1 = plan_only(first)
    from data.precompute_plan import record_generation
    from orchestration.precompute.job import plan_job

    fs, root_, plan, _, _ = plan_job(load_config("configs/precompute/tiny.yaml",
                                                 [*args, f"--precompute.inputs.list_file={first}"]).precompute)
    record_generation(fs, root_, plan)  # generation 1 pinned (nothing committed)
    del plan
    s2, peak2, base2, line2 = plan_only(grown)
    shutil.rmtree(tmp)  # ~200 MB of list and generation files
    print(f"\nbench/precompute.py --part plan: cpus={os.cpu_count()} load average {os.getloadavg()[0]:.1f}")
    print(f"  {line1.strip()}")
    print(f"  {line2.strip()}")
    for what, n, sec, peak, base in (("generation 1", inputs, s1, peak1, base1),
                                     (f"growth +{new}", inputs + new, s2, peak2, base2)):
        print(f"  plan-only {what:>16}: {n} inputs in {sec:6.2f} s ({sec / n * 1e6:5.2f} s per 1M; goal 1M < 30 s), "
              f"peak {peak:6.0f} MB = {base:4.0f} MB before listing + {peak - base:5.0f} MB "
              f"({(peak - base) * 2**20 / n:5.0f} bytes per input)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["all", "decode", "encode", "nodes", "plan", "forms"])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="part plan: URIs in the list file")
    ap.add_argument("--new", type=int, default=10_000, help="part plan: URIs added for the growth")
    ap.add_argument("--decode-frames", type=int, default=90)
    ap.add_argument("--vae", default="tiny", help="tiny, sdxl-shape, or a diffusers AutoencoderKL directory "
                                                   "(a trained VAE, e.g. SDXL's: its real posterior spread)")
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
    if args.part == "plan":
        bench_plan(tmp, args.inputs, args.new)
        return 0
    vae_path = str(sdxl_shape_vae(tmp / "sdxl-shape")) if args.vae == "sdxl-shape" else args.vae
    if args.part in ("all", "decode"):
        bench_decode(tmp, args.decode_frames)
        if args.part == "decode":
            return 0

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

    if args.part == "forms":
        bench_forms(vae, decoded, args)
        return 0

    def bare_loop() -> tuple[int, float]:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        n = sum(vae.moments(f).shape[0] for _, f in decoded)  # the job's default form: posterior
        torch.set_num_threads(os.cpu_count() or 1)
        return n, n / (time.perf_counter() - t0)

    if args.part == "nodes":
        bench_nodes(tmp, videos, video_cfg, vae_cfg, sum(f.shape[0] for _, f in decoded))
        return 0
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
    if args.part == "all":
        bench_forms(vae, decoded, args)
        bench_nodes(tmp, videos, video_cfg, vae_cfg, frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
