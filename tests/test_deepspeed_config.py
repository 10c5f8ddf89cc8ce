"""`parallel.deepspeed`: DeepSpeed knobs deep-merged over the generated config.

An override reaches the real engine (asserted on its parsed config after
deepspeed.initialize); a key our layout derives fails with a ConfigError that
names the key to set, at config load, before any process group starts.
Communication defaults follow the device: overlap_comm on CUDA/NPU, off on CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from parallel_harness import run_ranks

from jobconfig.errors import ConfigError
from jobconfig.loader import deep_merge as merge
from jobconfig.loader import load_config
from parallel.engine import build_engine, deepspeed_config
from tests.runs import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, message", [
    ("--parallel.deepspeed.zero_optimization.stage=3",
     "parallel.deepspeed.zero_optimization.stage: conflicts with parallel.zero_stage=2; set parallel.zero_stage"),
    ("--parallel.deepspeed.train_micro_batch_size_per_gpu=8",
     "parallel.deepspeed.train_micro_batch_size_per_gpu: derived from train.batch_size; set that instead"),
    ("--parallel.deepspeed.gradient_accumulation_steps=2", "derived from train.grad_accum_steps"),
    ("--parallel.deepspeed.train_batch_size=64", "parallel.deepspeed.train_batch_size: derived from train.batch_size"),
    ("--parallel.deepspeed.gradient_clipping=0.5", "derived from train.grad_clip"),
    ("--parallel.deepspeed.optimizer={type: Adam}", "parallel.deepspeed.optimizer: derived from train.lr"),
    ("--parallel.deepspeed.bf16.enabled=false",
     "parallel.deepspeed.bf16.enabled: conflicts with parallel.precision=bf16; set parallel.precision"),
    ("--parallel.deepspeed.fp16.enabled=true", "parallel.deepspeed.fp16.enabled: conflicts with parallel.precision"),
    ("--parallel.deepspeed.zero_optimization.offload_optimizer.pin_memory=true",
     "parallel.deepspeed.zero_optimization.offload_optimizer: needs parallel.offload_optimizer=true"),
    ("--parallel.deepspeed.zero_optimization=3", "parallel.deepspeed.zero_optimization: got 3, expected a mapping"),
    ("--parallel.deepspeed=[1]", "parallel.deepspeed: got [1], expected a mapping"),
])
def test_conflicting_override_fails_at_config_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert not dist.is_initialized()


def test_same_value_of_a_layout_key_is_accepted():
    cfg = load_config(None, ["--parallel.deepspeed.zero_optimization.stage=2", "--parallel.deepspeed.bf16.enabled=true"])
    assert deepspeed_config(cfg.parallel, cfg.train, dp_size=1)["zero_optimization"]["stage"] == 2


def test_overrides_deep_merge_and_win():
    cfg = load_config(None, ["--parallel.deepspeed.zero_optimization.reduce_bucket_size=1000",
                             "--parallel.deepspeed.zero_optimization.overlap_comm=false",
                             "--parallel.deepspeed.steps_per_print=5"])
    ds = deepspeed_config(cfg.parallel, cfg.train, dp_size=1, device_type="cuda")
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["overlap_comm"], ds["steps_per_print"]) == (1000, False, 5)
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True  # the rest of ours stays
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize("device_type, overlap", [("cuda", True), ("npu", True), ("cpu", False)])
def test_overlap_comm_follows_the_device(device_type, overlap):
    cfg = load_config(None)
    assert deepspeed_config(cfg.parallel, cfg.train, 1, device_type=device_type)["zero_optimization"][
        "overlap_comm"] is overlap


def _engine_config(rank: int, world_size: int) -> None:
    cfg = load_config(None, ["--parallel.device=cpu", "--parallel.precision=bf16",
                             "--parallel.deepspeed.zero_optimization.reduce_bucket_size=12345",
                             "--parallel.deepspeed.zero_optimization.allgather_bucket_size=23456",
                             "--parallel.deepspeed.zero_optimization.contiguous_gradients=false"])
    os.environ["DS_ACCELERATOR"] = "cpu"
    engine = build_engine(torch.nn.Linear(4, 4), cfg.parallel, cfg.train, world_size,
                          make_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                          make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          micro_batch=2, device_type="cpu")
    zero = engine._config.zero_config
    assert (zero.stage, zero.reduce_bucket_size, zero.allgather_bucket_size) == (2, 12345, 23456)
    assert zero.contiguous_gradients is False and zero.overlap_comm is False  # CPU: nothing to overlap
    assert engine._config.bfloat16_config.enabled and not engine._config.bfloat16_config.check_grad_overflow


@pytest.mark.slow
def test_override_reaches_the_real_engine():
    run_ranks(_engine_config, 1)  # a fresh process: DeepSpeed keeps its process groups in globals


def test_conflict_fails_before_any_process_starts(tmp_path):
    res = cli("train", "--config", str(REPO / "configs/debug.yaml"), "--nproc=2", f"--train.out_dir={tmp_path / 'run'}",
              "--parallel.deepspeed.zero_optimization.stage=3")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "parallel.deepspeed.zero_optimization.stage: conflicts with parallel.zero_stage=2" in res.stderr
    assert "torch.distributed" not in res.stderr and not (tmp_path / "run").exists()


def test_deepspeed_outside_the_declared_range_is_refused_naming_it():
    from parallel.engine import check_deepspeed_version, supported_deepspeed

    declared = supported_deepspeed()
    assert declared and "<" in declared  # pyproject pins an upper bound: our checkpoint reads DS internals
    check_deepspeed_version()  # the installed one is inside it
    with pytest.raises(RuntimeError, match=r"deepspeed 0\.99\.0 is installed; videogpt-pretrain supports deepspeed"):
        check_deepspeed_version("0.99.0", declared)
