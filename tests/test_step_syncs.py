"""A training step performs no device-to-host synchronisation between flush steps.

The real Trainer (debug model, synthetic data, DeepSpeed ZeRO-2 in bf16, one
gloo process) runs with every way of reading a tensor back to the host
counted (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool/float/int` of a
tensor) and `all_gather_object`, per step (between `after_step` hooks). On
CPU these calls cost nothing, but on a GPU each one stalls the host until
the device drains its queue, so a step that makes none lets the host run
ahead. Steps that are neither log steps (train.log_every), the first or the
last, nor checkpoint steps must make none; a flush step reads everything
back in one copy and one gather.

Two reads happen inside libraries and are allowed by name, so that any other
one, ours or a library's newly reached, still fails the test:
  DeepSpeed ZeRO-1/2 `unscale_and_clip_grads` checks the clip norm on the host
      (`is_invalid_grad_norm`: bool of a device tensor) whenever
      train.grad_clip > 0: one sync per step that only a DeepSpeed change removes.
  torch.optim's `_get_value` reads AdamW's step counter, a host tensor unless the
      optimiser is capturable or fused (the CUDA path is fused): no device involved.
"""
from __future__ import annotations

import collections
import json
import traceback

import pytest
import torch
import torch.distributed as dist
from parallel_harness import run_ranks

from jobconfig.loader import CONFIG_ROOT, load_config
from pretrain.training.hooks import TrainerHooks
from pretrain.training.trainer import Trainer

READS = [(torch.Tensor, n) for n in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")]
GATHERS = [(dist, n) for n in ("all_gather_object", "broadcast_object_list", "gather_object")]


# (file path ending, function) of a stack frame that makes a read allowed (see the module docstring)
ALLOWED = [("deepspeed/runtime/zero/stage_1_and_2.py", "unscale_and_clip_grads"),
           ("torch/optim/optimizer.py", "_get_value")]


def allowed(stack: list[traceback.FrameSummary]) -> bool:
    return any(f.filename.endswith(path) and f.name == fn for f in stack for path, fn in ALLOWED)


class SyncCounter:
    """Counts calls of the patched functions (less the allowed ones); remembers where each kind was
    first called from. Patches for good: it lives in a spawned process of its own."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.where: dict[str, str] = {}
        for owner, name in READS + GATHERS:
            setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            stack = traceback.extract_stack(limit=8)[:-1]
            if not allowed(stack):
                self.calls[name] += 1
                self.where.setdefault(name, "".join(traceback.format_list(stack)))
            return fn(*args, **kwargs)
        return counted

    def take(self) -> tuple[collections.Counter, dict]:
        calls, where = self.calls, self.where
        self.calls, self.where = collections.Counter(), {}
        return calls, where


def _train_counting(rank: int, world_size: int, out: str) -> None:
    cfg = load_config(CONFIG_ROOT / "debug.yaml", [
        "--parallel.device=cpu", "--parallel.zero_stage=2", "--parallel.precision=bf16", "--train.steps=9",
        "--train.log_every=4", "--train.checkpoint_every=6", "--train.grad_accum_steps=2", "--train.batch_size=2",
        "--train.tensorboard=false", "--synthetic.frames=6", "--model.attention=blockwise", f"--train.out_dir={out}"])
    per_step: dict[int, tuple] = {}
    counter: SyncCounter | None = None

    def after_step(trainer: Trainer) -> None:
        per_step[trainer.step] = counter.take()

    with Trainer(cfg, "syncs", hooks=TrainerHooks(after_step=after_step)) as trainer:
        counter = SyncCounter()
        trainer.run(resume="none")
    flush_steps = {1, 4, 6, 8, 9}  # first, log_every, checkpoint, last
    for step in range(1, 10):
        calls, where = per_step[step]
        if step in flush_steps:
            # one read-back and one gather for the whole window (a checkpoint save adds its own)
            assert calls["tolist"] >= 1 and calls["all_gather_object"] >= 1, (step, calls)
        else:
            assert not calls, f"step {step} synced with the host: {dict(calls)}\n" + \
                "\n".join(f"-- {k}:\n{v}" for k, v in where.items())


@pytest.mark.slow
def test_steps_between_flushes_make_no_host_sync(tmp_path):
    run_ranks(_train_counting, 1, (str(tmp_path),))  # a fresh process: DeepSpeed keeps its groups in globals
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 10))
    assert all(len(m["sample_rows"]) == 4 and m["samples"] == 4 and m["loss"] > 0 for m in lines)
    assert all(m["attention_pairs"] > 0 and m["tokens"] > 0 for m in lines)
