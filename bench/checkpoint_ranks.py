"""The multi-rank part of bench/checkpoint.py: a resume on another world size, timed on every rank at once.

    python bench/checkpoint_ranks.py --from-ranks 2 --to-ranks 3 [--dir DIR] [--hidden 768] [--layers 8]
                                     [--zero 2] [--repeats 3]

Starts FROM processes (loopback gloo, the real DeepSpeed engine) that train one
step and save a checkpoint, then TO processes that each train one step of
their own and save one (the same-layout checkpoint of the new world size), and
then measure, cold (every checkpoint file evicted from the page cache first),
each the best of --repeats, the wall time between two barriers:

  same-layout load   CheckpointManager.load of the TO-rank checkpoint into the
                     TO-rank engine (each rank its own file);
  resharded load     the FROM-rank checkpoint into the TO-rank engine, what a
                     resume on another layout does (fragment_reader.py +
                     resharded_load.py, each rank reading its byte ranges), and
                     each rank's peak resident memory, and how far it rose above
                     what the rank held before (its engine, model and optimizer
                     state, which the load writes into in place);
  raw read           the very byte ranges the resharded load read, on every rank,
                     with pread into one buffer: the aggregate raw read of the
                     same bytes.

Prints one JSON line (bench/checkpoint.py prints the figures). Verification
(the manifest's checksums) is left out of all three: a resume runs it before
either load alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.disk import drop_cache  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Resident memory sampled every millisecond on a thread while the block runs: peak above the start."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def worker(args) -> None:
    """One rank (RANK/WORLD_SIZE from the environment): `save` or `measure`."""
    import torch
    import torch.distributed as dist

    from bench.checkpoint import build
    from pretrain.checkpoint.fragment_reader import SavedFragments
    from pretrain.checkpoint.optimizer_fragments import fragment, prepare_optimizer_state
    from pretrain.checkpoint.resharded_load import load_resharded

    torch.set_num_threads(1)
    base = Path(args.dir)
    trainer = build(args, base / f"run{os.environ['WORLD_SIZE']}")
    mgr, engine, model = trainer.ckpt, trainer.engine, trainer.model
    mgr.save(engine, 1, trainer.trainer_state(), trainer._barrier, model=model)
    if args.role == "save":
        return
    mine = mgr.root / "step_00000001"
    theirs = base / f"run{args.from_ranks}" / "checkpoints" / "step_00000001"
    everything = files_of(mine) + files_of(theirs)
    layout = trainer.parallel_layout()
    # this rank's new shard: its fp32 master fragments and moments (what it must end up holding)
    opt = engine.optimizer
    opt_base = prepare_optimizer_state(opt, step=None)
    shard = sum(3 * 4 * f[0].numel() for p in model.parameters() if (f := fragment(opt, opt_base, p)) is not None)

    def timed(fn) -> float:
        drop_cache(everything)
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    ranges: list = []
    out = {"same": [], "resharded": [], "raw": [], "grown": [], "peak": []}
    for _ in range(args.repeats):
        out["same"].append(timed(lambda: mgr.load(engine, mine, model=model, layout=layout)))
        ranges.clear()
        peak = PeakRss()

        def resharded():
            with peak:
                saved = SavedFragments(theirs, log=ranges)
                try:
                    load_resharded(engine, model, saved)
                finally:
                    saved.close()
        out["resharded"].append(timed(resharded))
        out["grown"].append(peak.grown)
        out["peak"].append(peak.peak)
        buf = torch.empty(max(n for _, _, n in ranges), dtype=torch.uint8)
        view = memoryview(buf.numpy())

        def raw():
            fds = {}
            for path, offset, n in ranges:
                fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
                done = 0
                while done < n:
                    done += os.preadv(fd, [view[done:n]], offset + done)
            for fd in fds.values():
                os.close(fd)
        out["raw"].append(timed(raw))
    saved = SavedFragments(theirs)
    out.update(rank=int(os.environ["RANK"]), bytes=sum(n for _, _, n in ranges), shard=shard,
               largest=saved.largest_parameter_bytes(), checkpoint=sum(p.stat().st_size for p in files_of(theirs)),
               same_bytes=sum(p.stat().st_size for p in files_of(mine)))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered), flush=True)


def run_ranks(args, role: str, world: int) -> str:
    """`world` processes of this script in `role`, on loopback; rank 0's output."""
    from parallel.device import free_port

    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--role", role, "--dir", args.dir, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--zero", str(args.zero), "--repeats", str(args.repeats),
               "--from-ranks", str(args.from_ranks), "--to-ranks", str(args.to_ranks)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{role} on {world} ranks failed:\n" + "\n".join(o[-3000:] for o in outs))
    return outs[0]


def measure(args) -> list[dict]:
    """Both phases; every rank's figures."""
    run_ranks(args, "save", args.from_ranks)
    out = run_ranks(args, "measure", args.to_ranks)
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["main", "save", "measure"], default="main")
    p.add_argument("--dir", default=None)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--from-ranks", type=int, default=2)
    p.add_argument("--to-ranks", type=int, default=3)
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    if a.role == "main":
        import shutil
        import tempfile

        a.dir = tempfile.mkdtemp(prefix="vgpt-bench-reshard-", dir=a.dir or Path.cwd())
        try:
            print(json.dumps(measure(a)))
        finally:
            shutil.rmtree(a.dir, ignore_errors=True)
    else:
        worker(a)
