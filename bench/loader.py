"""Loader throughput vs the raw read bandwidth of the same shard files, measured in one run; or,
with --samples, the dataset index at scale (start-up and resident memory per process kind).

    python bench/loader.py [--root DIR] [--shards 12] [--videos 32] [--frames 64] [--workers 0 1 2]
                           [--shapes 22x40 30x30 40x22]
    python bench/loader.py --samples 10000000 [--shard-size 1000] [--legacy]
    python bench/loader.py --forms [--shards 8] [--videos 48] [--frames 64] [--workers 0 2]

Index mode (bench/loader_index.py) publishes a synthetic index (data/synthetic/shards.py
`write_synthetic_index`: no tensors, no tars) and prints its build time, then one line per process
kind, each measured in a fresh interpreter: the trainer's rank (index read -> first batch planned:
DatasetMeta + build_buckets + the first window of data/order.py's Schedule), a DataLoader worker
(what it is handed, unpickled, and its first window's reads planned), the preflight, and two
DataLoader workers side by side; each with `start-up <seconds> s` and `resident <MB> MB` (RSS the
index adds to the process), next to a raw read of the same columns (np.load of every array) as a
ratio. --legacy adds the same figures for the index.json of format 1 (every shard inline).

Throughput mode:

Writes a toy latent dataset (bf16 latents of 4x22x40, i.e. 320x176 video, in the
real shard format; --shapes for several aspect ratios, batched by shape bucket)
unless --root names one, then measures:
  raw:    every shard file read sequentially in 4 MiB chunks (what `cat` does);
  twice:  "cached" (files in the page cache: raw is then memory bandwidth) and
          "cold" (the shard files, and only they, evicted with posix_fadvise
          DONTNEED before every run, raw and loader alike: disk bandwidth);
  loader: one epoch of stage 1 sampling (16 frames at interval 4, batch 4), per
          worker count, with and without sha256 verification. MB/s counts the
          shard bytes of the positions served (the loader must read whole videos).
Each figure is the best of --repeats runs (the machine is shared; best-of is the
least noisy estimate of what it can do). Prints one line per configuration with
samples/s, MB/s and the ratio to raw.
The goal is >= 0.8 of raw. No figure here is asserted anywhere: it is a report.

Forms mode (--forms): the same videos written twice, in the `posterior` latent form (mean and std per
frame, 2 x 4 channels) and the `sample` form (one draw, 4 channels; data/shard_format.py), and one
cached-mode epoch of each per worker count, the two alternated, best of --repeats: samples/s of each
and the ratio posterior / sample (goal >= 0.9); plus the objective's cost of drawing from a posterior
batch (pretrain/training/objective.py add_noise) against a one-draw batch of the same shape.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.disk import drop_cache, raw_read  # noqa: E402
from bench.loader_index import index_bench  # noqa: E402
from data.dataset_index import open_dataset  # noqa: E402
from data.loader import LatentLoader  # noqa: E402
from data.shard_format import decode_sample, get_fs, iter_tar  # noqa: E402
from data.synthetic.shards import write_toy_dataset  # noqa: E402
from jobconfig.data import DataConfig, StageSamplingConfig  # noqa: E402


def component_ceilings(path: str) -> dict[str, float]:
    """MB/s of each per-byte stage of the loader on one core, on one shard (best of 3)."""
    data = open(path, "rb").read()
    samples = list(iter_tar(data))
    stages = {"sha256": lambda: hashlib.sha256(data).digest(), "tar parse": lambda: list(iter_tar(data)),
              "safetensors decode": lambda: [decode_sample(m) for _, m in samples]}
    out = {}
    for name, fn in stages.items():
        best = min(_timed(fn) for _ in range(3))
        out[name] = len(data) / best / 1e6
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def loader_epoch(cfg: DataConfig, paths: list[str], cold: bool = False) -> tuple[float, int]:
    loader = LatentLoader(cfg)
    if cold:
        drop_cache(paths)
    t = time.perf_counter()
    served = 0
    for batch in loader:
        served += sum(len(row) for row in batch.clips)
    return time.perf_counter() - t, served


def forms_bench(args) -> None:
    from jobconfig.train import ObjectiveConfig
    from pretrain.training.objective import add_noise, row_seed

    hw = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    shapes = [(4, *hw[v % len(hw)]) for v in range(args.videos * args.shards)]
    stage = StageSamplingConfig(frames=16, interval="fixed", interval_value=4, clips="single_frame")
    with tempfile.TemporaryDirectory(prefix="vgpt-bench-") as tmp:
        roots = {}
        for form in ("posterior", "sample"):
            roots[form] = f"{tmp}/{form}"
            write_toy_dataset(roots[form], [args.videos] * args.shards, frames=args.frames, shape=shapes,
                              dtype=torch.bfloat16, latent_form=form)
        sizes = {f: sum(os.path.getsize(f"{r}/shards/{name}.tar") for name in open_dataset(r).names)
                 for f, r in roots.items()}
        n = args.videos * args.shards
        print(f"forms: {n} videos of {args.frames} frames {args.shapes} in {args.shards} shards; posterior "
              f"{sizes['posterior'] / 1e6:.1f} MB, sample {sizes['sample'] / 1e6:.1f} MB; cpus={os.cpu_count()} "
              f"load average {os.getloadavg()[0]:.1f}")
        for verify in (True, False):
            for workers in args.workers:
                best = {}
                for _ in range(args.repeats):  # alternated: the box is shared
                    for form, root in roots.items():
                        cfg = DataConfig(root=root, batch_size=4, num_workers=workers, epochs=args.epochs,
                                         shuffle_buffer=64, verify_sha256=verify, dtype="bfloat16", stage=stage)
                        secs, served = loader_epoch(cfg, [])
                        best[form] = max(best.get(form, 0.0), served / secs)
                mbs = {f: best[f] * sizes[f] / n / 1e6 for f in best}
                post, one = best["posterior"], best["sample"]
                print(f"[cached] loader workers={workers} sha256={'on ' if verify else 'off'}: posterior "
                      f"{post:7.1f} samples/s ({mbs['posterior']:6.1f} MB/s), sample {one:7.1f} samples/s "
                      f"({mbs['sample']:6.1f} MB/s); ratio posterior / sample {post / one:5.2f} in samples/s, "
                      f"{mbs['posterior'] / mbs['sample']:5.2f} in MB/s")
        batches = {f: next(iter(LatentLoader(DataConfig(root=r, batch_size=4, stage=stage))))
                   for f, r in roots.items()}
        seeds = [row_seed(0, g) for g in batches["sample"].row_index]
        cost, threads = {}, torch.get_num_threads()
        torch.set_num_threads(1)  # intra-op threads on a shared 2-core box only add noise
        for form, batch in batches.items():
            cost[form] = min(_timed(lambda: add_noise(batch, ObjectiveConfig(), seeds)) for _ in range(20))
        torch.set_num_threads(threads)
        print(f"objective add_noise (1 thread), a batch of 4 x 16 frames: posterior {cost['posterior'] * 1e3:.2f} ms, "
              f"sample {cost['sample'] * 1e3:.2f} ms (the draws: +{(cost['posterior'] - cost['sample']) * 1e3:.2f} ms "
              "a batch)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="an existing latent dataset (default: write a toy one to a temp dir)")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--videos", type=int, default=48, help="videos per shard")
    ap.add_argument("--frames", type=int, default=64, help="stored latent frames per video")
    ap.add_argument("--shapes", nargs="+", default=["22x40"],
                    help="latent HxW of the videos, assigned in turn (e.g. 22x40 30x30 40x22: three aspect "
                         "ratios, one shape bucket each)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs (the machine is shared)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per cached-mode run (amortises worker start)")
    ap.add_argument("--samples", type=int, help="index mode: a synthetic index of this many samples")
    ap.add_argument("--shard-size", type=int, default=1000, help="index mode: samples per shard")
    ap.add_argument("--legacy", action="store_true", help="index mode: also the format-1 index.json")
    ap.add_argument("--forms", action="store_true", help="posterior-form vs sample-form dataset (see above)")
    args = ap.parse_args()
    if args.samples:
        index_bench(args.samples, args.shard_size, args.legacy, args.root)
        return
    if args.forms:
        forms_bench(args)
        return

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="vgpt-bench-")
        root = tmp.name
        hw = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
        shapes = [(4, *hw[v % len(hw)]) for v in range(args.videos * args.shards)]
        write_toy_dataset(root, [args.videos] * args.shards, frames=args.frames, shape=shapes,
                          dtype=torch.bfloat16)
    fs, path = get_fs(root)
    meta = open_dataset(root)
    paths = [f"{path}/shards/{name}.tar" for name in meta.names]
    total = sum(os.path.getsize(p) for p in paths)
    n = meta.num_samples
    print(f"dataset: {len(paths)} shards, {n} videos, {total / 1e6:.1f} MB; cpus={os.cpu_count()} "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine skews every figure)")

    ceilings = component_ceilings(paths[0])
    print("one-core ceilings of the loader's per-byte work: "
          + ", ".join(f"{k} {v:.0f} MB/s" for k, v in ceilings.items()))
    stage = StageSamplingConfig(frames=16, interval="fixed", interval_value=4, clips="single_frame")
    for cold in (False, True):
        where = "cold (page cache dropped per run)" if cold else "cached (page cache warm)"
        raw_read(paths)  # warm-up
        raw = min(raw_read(paths, cold) for _ in range(args.repeats))
        raw_mbs = total / raw / 1e6
        print(f"[{where}] raw sequential read: {raw_mbs:8.1f} MB/s ({n / raw:8.1f} videos/s)")
        for verify in (True, False):
            for workers in args.workers:
                cfg = DataConfig(root=root, batch_size=4, num_workers=workers, epochs=1 if cold else args.epochs,
                                 shuffle_buffer=64,
                                 verify_sha256=verify, dtype="bfloat16", stage=stage)
                loader_epoch(cfg, paths)  # warm-up (worker start, caches)
                runs = [loader_epoch(cfg, paths, cold) for _ in range(args.repeats)]
                secs, served = min(runs)
                mbs = served * (total / n) / secs / 1e6
                print(f"[{where}] loader workers={workers} sha256={'on ' if verify else 'off'}: "
                      f"{served / secs:7.1f} samples/s {mbs:7.1f} MB/s  ratio to raw {mbs / raw_mbs:5.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
