"""Checkpoint save/load throughput vs the raw write/read bandwidth of the same disk, in one run.

    python bench/checkpoint.py [--dir DIR] [--hidden 768] [--layers 8] [--zero 2] [--repeats 3]
                               [--from-ranks 2 --to-ranks 3] [--resharded-only]

Builds the Video-GPT backbone at the given width and depth (default: ~57M
parameters, ~230 MB of fp32 weights; the DeepSpeed checkpoint with fp32 master
weights and Adam moments is ~4x that), trains one step on one process (real
DeepSpeed engine, gloo), then measures, each the best of --repeats runs:

  raw write   the checkpoint's bytes written in files of the same sizes, 4 MiB
              writes, fsync per file (what a durable save must at least pay);
  raw read    those files read back cold (evicted with posix_fadvise DONTNEED);
  save        CheckpointManager.save, synchronous: each rank's partition and the
              module as safetensors (sharded.py), RNG, trainer state, CRC-32 per
              block while writing, fsync of every file, manifest, `latest`;
  stall       the same save with background=True: what the training loop waits
              for (the copy of the state into host memory), then its commit is
              waited for outside the timing;
  DeepSpeed   DeepSpeed's own save_checkpoint (pickled .pt files) + fsync, alone,
              for comparison (what earlier versions wrote);
  load        what `--resume auto` does, cold: manifest verification (CRC-32 of
              every block) plus CheckpointManager.load into the engine;
  reshard     `vgpt ckpt reshard`: the offline portable copy (make_portable),
              read by byte ranges and written one parameter at a time, cold;
  resharded   a resume on another world size (--from-ranks -> --to-ranks
              processes, bench/checkpoint_ranks.py): the same-layout load of the
              new world size's own checkpoint, the resharded load of the old
              one (every rank reading its byte ranges at once), and the raw
              read of the very byte ranges it read, all ranks at once, cold;
              and each rank's peak resident memory during the resharded load,
              against its own new shard plus the largest parameter (goal < 1.5x).

GB/s counts the checkpoint's bytes (the resharded rows: the bytes read). Prints
ratios to raw (goal >= 0.5) and the stall of an async save as a fraction of a
synchronous one (goal <= 0.1). No figure here is asserted anywhere: it is a
report.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.disk import CHUNK, drop_cache, raw_read  # noqa: E402


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def raw_write(sizes: list[int], where: Path) -> float:
    buf = os.urandom(CHUNK)  # incompressible, as trained weights are
    where.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i, size in enumerate(sizes):
        with open(where / f"f{i}", "wb", buffering=0) as f:
            left = size
            while left > 0:
                left -= f.write(memoryview(buf)[:min(left, CHUNK)])
            os.fsync(f.fileno())
    return time.perf_counter() - t


def build(args, out: Path):
    from jobconfig.loader import load_config
    from pretrain.training.trainer import Trainer

    overrides = [f"--model.hidden_size={args.hidden}", f"--model.num_layers={args.layers}",
                 f"--model.num_heads={args.hidden // 64}", f"--model.mlp_size={args.hidden * 8 // 3 // 64 * 64}",
                 "--parallel.precision=fp32", f"--parallel.zero_stage={args.zero}", "--parallel.device=cpu",
                 "--train.steps=1", "--train.batch_size=1", "--train.tensorboard=false", "--synthetic.frames=2",
                 "--synthetic.latent_height=4", "--synthetic.latent_width=4", "--model.attention=blockwise",
                 f"--train.out_dir={out}", "--train.keep_last=1"]
    trainer = Trainer(load_config(Path(__file__).resolve().parents[1] / "configs/debug.yaml", overrides))
    trainer.train_step()  # Adam state exists from here on
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir on the current disk)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--from-ranks", type=int, default=2, help="world size that writes the resharded checkpoint")
    parser.add_argument("--to-ranks", type=int, default=3, help="world size that resumes from it")
    parser.add_argument("--resharded-only", action="store_true", help="only the multi-rank resharded rows")
    args = parser.parse_args()
    if not args.resharded_only:
        single(args)
    resharded(args)
    return 0


def resharded(args) -> None:
    from bench import checkpoint_ranks

    base = Path(tempfile.mkdtemp(prefix="vgpt-bench-reshard-", dir=args.dir or Path.cwd()))
    try:
        ranks = checkpoint_ranks.measure(argparse.Namespace(**{**vars(args), "dir": str(base)}))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    t = {k: min(ranks[0][k]) for k in ("same", "resharded", "raw")}  # wall times between barriers: rank 0's
    read = sum(r["bytes"] for r in ranks) / 1e9  # every rank's bytes: the aggregate read
    same = ranks[0]["same_bytes"] / 1e9
    print(f"resume on another world size: {args.from_ranks} -> {args.to_ranks} ranks, checkpoint "
          f"{ranks[0]['checkpoint'] / 1e6:.0f} MB, {read * 1000:.0f} MB read by all ranks, best of {args.repeats}")
    print(f"  {'raw read of those bytes':28s} {t['raw']:7.2f} s  {read / t['raw']:6.2f} GB/s")
    print(f"  {'resharded load':28s} {t['resharded']:7.2f} s  {read / t['resharded']:6.2f} GB/s  "
          f"{t['raw'] / t['resharded']:6.2f}x raw  {t['resharded'] / t['same']:.2f}x the time of a same-layout load")
    print(f"  {'same-layout load':28s} {t['same']:7.2f} s  {same / t['same']:6.2f} GB/s  "
          f"({args.to_ranks}-rank checkpoint, {same * 1000:.0f} MB)")
    for r in ranks:
        bound = r["shard"] + r["largest"]
        print(f"  rank {r['rank']}: peak resident memory {max(r['peak']) / 1e6:.0f} MB, "
              f"+{max(r['grown']) / 1e6:.0f} MB during the resharded load; own new shard {r['shard'] / 1e6:.0f} MB + largest parameter "
              f"{r['largest'] / 1e6:.0f} MB = {bound / 1e6:.0f} MB ({max(r['grown']) / bound:.2f}x)")


def single(args) -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() // 2))
    base = Path(tempfile.mkdtemp(prefix="vgpt-bench-ckpt-", dir=args.dir or Path.cwd()))
    try:
        from pretrain.checkpoint.integrity import fsync_path
        from pretrain.checkpoint.reshard import make_portable

        trainer = build(args, base / "run")
        n_params = sum(p.numel() for p in trainer.model.parameters())
        mgr, engine = trainer.ckpt, trainer.engine
        step = [0]

        def save(background: bool = False) -> float:
            step[0] += 1
            t = time.perf_counter()
            mgr.save(engine, step[0], trainer.trainer_state(), trainer._barrier, model=trainer.model,
                     background=background)
            stall = time.perf_counter() - t
            mgr.wait()  # the commit (async) and the pruned checkpoint's deletion, outside the timing
            return stall

        def ds_save() -> float:
            """DeepSpeed's own checkpoint engine (not our hashing one) and an fsync per file."""
            d = base / "ds_only"
            shutil.rmtree(d, ignore_errors=True)
            ours = engine.checkpoint_engine
            engine.checkpoint_engine = getattr(ours, "inner", ours)
            try:
                t = time.perf_counter()
                engine.save_checkpoint(str(d), tag="t", save_latest=False)
                for p in files_of(d):
                    fsync_path(p)
                return time.perf_counter() - t
            finally:
                engine.checkpoint_engine = ours

        def load(paths: list[Path]) -> float:
            drop_cache(paths)
            t = time.perf_counter()
            found = mgr.root / mgr.store.choose(full=True).required()
            mgr.load(engine, found, model=trainer.model, layout=trainer.parallel_layout())
            return time.perf_counter() - t

        def portable(ckpt: Path, paths: list[Path]) -> float:
            drop_cache(paths)
            t = time.perf_counter()
            make_portable(ckpt, base / "portable" / ckpt.name, trainer.parallel_layout(), verified=True)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {k: [] for k in ("write", "read", "save", "stall", "ds", "load", "convert")}
        save(background=True)  # host buffers are allocated once, at the first save of a run
        def settle() -> None:
            """Every write starts from the same page-cache state: none of our files cached, so each
            write gets free pages alike (writing while the kernel must reclaim pages is several times
            slower here, whatever writes)."""
            drop_cache(files_of(base))

        for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every figure alike
            settle()
            times["stall"].append(save(background=True))
            settle()
            times["save"].append(save())
            ckpt = mgr.root / mgr.store.choose(full=False).required()
            paths = files_of(ckpt)
            shutil.rmtree(base / "raw", ignore_errors=True)
            settle()
            times["write"].append(raw_write([p.stat().st_size for p in paths], base / "raw"))
            times["read"].append(raw_read(files_of(base / "raw"), cold=True))
            settle()
            times["ds"].append(ds_save())
            times["load"].append(load(paths))
            times["convert"].append(portable(ckpt, paths))
        nbytes = sum(p.stat().st_size for p in paths)
        t = {k: min(v) for k, v in times.items()}
    finally:
        shutil.rmtree(base, ignore_errors=True)

    gb = nbytes / 1e9
    print(f"model {n_params / 1e6:.1f}M parameters ({n_params * 4 / 1e6:.0f} MB fp32), ZeRO-{args.zero}, "
          f"checkpoint {gb * 1000:.0f} MB in {len(paths)} files, best of {args.repeats}")
    rows = [("raw write+fsync", t["write"], None), ("raw read (cold)", t["read"], None),
            ("save (CheckpointManager)", t["save"], t["write"]),
            ("  DeepSpeed .pt save + fsync", t["ds"], t["write"]),
            ("load (verify + load, cold)", t["load"], t["read"]),
            ("ckpt reshard (portable copy)", t["convert"], t["read"])]
    for name, secs, raw in rows:
        ratio = f"{raw / secs:6.2f}x raw" if raw else ""
        print(f"  {name:28s} {secs:7.2f} s  {gb / secs:6.2f} GB/s  {ratio}")
    print(f"  {'stall of an async save':28s} {t['stall']:7.2f} s  stall {t['stall'] / t['save']:.3f}x "
          "of a synchronous save")


if __name__ == "__main__":
    sys.exit(main())
