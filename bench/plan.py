"""Planned vs measured peak memory of a training step on CPU: the memory plan's accuracy.

    python bench/plan.py            # every case below, a few minutes on 2 cores
    python bench/plan.py --quick    # a handful

For each case (model size, stage length, ZeRO stage, TP, SP, checkpointing),
the plan (pretrain/training/memory_plan.py, the host: no device) is compared
with a real run of the same layout: `build_model`, `parallelize`, the DeepSpeed
engine under gloo (2 processes for TP 2 or SP 2), two optimiser steps on a
batch of the plan's longest sample (every clip one frame).

Measured: the peak of allocated bytes on rank 0, by a tracked allocator: every
storage the run creates through PyTorch's dispatcher from before the model is
built (`MemTracker` in real mode, which follows each storage from creation to
its last reference; the CPU allocator keeps no statistics of its own). That
covers the weights, DeepSpeed's flat fp32 copies, optimizer moments, gradient
buckets, gloo's send/receive tensors and activations; the CPU attention
kernel's internal scratch is not a tensor and is in neither number. The
DeepSpeed reduce bucket is set to 2e6 elements (it is 5e8 by default, which
would make every ZeRO-1/2 case that one buffer and hide the rest). Prints the
table and `worst error <N>%`.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import weakref

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobconfig.curriculum import plan_stages  # noqa: E402
from pretrain.training.memory_plan import plan_stage  # noqa: E402

BUCKET = ["--parallel.deepspeed={zero_optimization: {reduce_bucket_size: 2000000, "
          "stage3_prefetch_bucket_size: 200000, allgather_bucket_size: 2000000}}"]
# (preset, frames, latent side, zero, tp, sp, checkpointing, precision)
CASES = [
    ("debug", 4, 8, 0, 1, 1, False, "fp32"), ("debug", 8, 16, 0, 1, 1, False, "fp32"),
    ("debug", 8, 16, 2, 1, 1, True, "fp32"), ("debug", 16, 16, 1, 1, 1, False, "fp32"),
    ("s1", 8, 16, 0, 1, 1, False, "fp32"), ("s1", 16, 16, 2, 1, 1, True, "fp32"),
    ("s1", 8, 16, 3, 1, 1, False, "fp32"), ("s2", 8, 16, 2, 1, 1, False, "fp32"),
    ("s2", 16, 16, 1, 1, 1, True, "bf16"), ("s3", 8, 16, 2, 1, 1, False, "fp32"),
    ("s3", 4, 16, 0, 1, 1, True, "fp32"),
    ("s1", 8, 16, 2, 2, 1, False, "fp32"), ("s2", 8, 16, 0, 2, 1, False, "fp32"),
    ("s1", 8, 16, 2, 1, 2, False, "fp32"), ("s2", 16, 16, 1, 1, 2, True, "fp32"),
    ("s3", 8, 16, 3, 1, 2, False, "fp32"),
    ("s1", 8, 16, 0, 1, 1, False, "bf16"), ("s2", 8, 16, 2, 1, 1, True, "bf16"),
]
QUICK = [CASES[i] for i in (1, 2, 6, 11, 13)]


def case_config(preset, frames, side, zero, tp, sp, ac, precision):
    args = [f"--model.preset={preset}", "--model.attention=blockwise", "--train.data=synthetic",
            f"--synthetic.frames={frames}", f"--synthetic.latent_height={side}", f"--synthetic.latent_width={side}",
            "--train.batch_size=1", f"--parallel.zero_stage={zero}", f"--parallel.tensor_parallel={tp}",
            f"--parallel.sequence_parallel={sp}", f"--parallel.activation_checkpointing={str(ac).lower()}",
            f"--parallel.precision={precision}", "--parallel.device=cpu", "--train.tensorboard=false", *BUCKET]
    return plan_stages(str(REPO / "configs/debug.yaml"), args, None)[0][1]


class LiveBytes(TorchDispatchMode):
    """A tracked allocator: the bytes of every storage alive that an op made while this mode was on,
    and their peak, checked after every op. A storage is counted once (views share it) and leaves the
    count when its last reference dies (a weak reference's callback)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def exclude(self, tensors) -> "LiveBytes":
        """Storages that existed before (weights): their views are not new memory."""
        for t in tensors:
            self.seen[t.untyped_storage()] = None
        return self

    def _free(self, nbytes: int):
        def cb(_):
            self.live -= nbytes
        return cb

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st not in self.seen:
                    n = st.nbytes()
                    self.seen[st] = weakref.ref(st, self._free(n))
                    self.live += n
        self.peak = max(self.peak, self.live)
        return out


def _measure(rank: int, world: int, port: int, case, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from parallel.device import destroy_process_group, init_process_group, select_device
    from parallel.dims import ParallelDims, build_process_groups
    from parallel.engine import build_engine
    from pretrain.model.videogpt import build_model
    from pretrain.training.memory_plan import planned_rows
    from pretrain.training.optimizer import build_optimizer, build_scheduler
    from pretrain.training.parallelize import parallelize

    cfg = case_config(*case)
    dev = select_device("cpu").activate()
    init_process_group(dev)
    pc = cfg.parallel
    dims = ParallelDims.from_config(pc, world, cfg.model)
    groups = build_process_groups(dims) if dims.tp * dims.sp > 1 else None
    mpu = groups.deepspeed_mpu() if groups else None
    rows = planned_rows(cfg, (case[2], case[2]))
    tracker = LiveBytes()
    with tracker:
        model = build_model(cfg.model, device="cpu")
        parallelize(model, pc, groups)
        engine = build_engine(model, pc, cfg.train, mpu.get_data_parallel_world_size() if mpu else world,
                              make_optimizer=lambda p: build_optimizer(p, cfg.train, "cpu"),
                              make_scheduler=lambda o: build_scheduler(o, cfg.train, world), mpu=mpu,
                              micro_batch=1, device_type="cpu")
        seq = engine.module.sequence(rows, (case[2], case[2]))
        tracker.peak = tracker.live  # the steps' peak: set-up transients (weight init, broadcasts) are not planned
        for _ in range(2):
            x = torch.randn(1, len(rows[0][0]), cfg.model.latent_channels, case[2], case[2])
            out_ = engine(torch.randn_like(x), x, torch.rand(1, x.shape[1]), seq)
            loss = ((out_.float() - x) ** 2).mean()
            engine.backward(loss)
            engine.step()
            del out_, loss
    peak = tracker.peak
    if rank == 0:
        out.put(int(peak))
    destroy_process_group()


def measure(case) -> int:
    world = max(case[4] * case[5], 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_measure, args=(world, port, case, q), nprocs=world, start_method="spawn")
    return q.get()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{'model':<6}{'frames':>7}{'latent':>7}{'ZeRO':>5}{'TP':>3}{'SP':>3}{'AC':>4}{'prec':>6}"
          f"{'tokens':>8}{'planned MB':>12}{'measured MB':>12}{'error':>8}{'plan s':>8}")
    worst = 0.0
    for case in (QUICK if args.quick else CASES):
        preset, frames, side, zero, tp, sp, ac, precision = case
        t0 = time.perf_counter()
        cfg = case_config(*case)
        p = plan_stage(cfg, tp * sp, None, (side, side), find_fix=False)
        plan_s = time.perf_counter() - t0
        got = measure(case)
        err = (p.peak - got) / got
        worst = max(worst, abs(err))
        print(f"{preset:<6}{frames:>7}{side:>7}{zero:>5}{tp:>3}{sp:>3}{'y' if ac else 'n':>4}{precision:>6}"
              f"{p.tokens:>8}{p.peak / 2**20:>12.2f}{got / 2**20:>12.2f}{err:>+8.1%}{plan_s:>8.2f}", flush=True)
    print(f"worst error {worst * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
