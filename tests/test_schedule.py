"""The LR schedule and the DeepSpeed config generated from our config tree."""
import json
import math

import pytest
import torch

from jobconfig.errors import ConfigError
from jobconfig.loader import CONFIG_ROOT, load_config
from parallel.engine import deepspeed_config
from pretrain.training.optimizer import adamw_kwargs, build_optimizer, build_scheduler, lr_lambda

STAGE_FILES = [CONFIG_ROOT / "stages" / f"stage{i}.yaml" for i in range(1, 5)]


def lrs_per_step(tc, world_size: int, n_steps: int, start=None) -> list[float]:
    """The LR of optimiser steps 0..n_steps-1 under build_scheduler, stepped as the engine does:
    once per optimiser step, after it."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], tc, "cpu")
    sched = build_scheduler(opt, tc, world_size)
    if start is not None:  # a resume: the checkpoint restores the scheduler and the optimizer's LR
        sched.load_state_dict(start)
        opt.param_groups[0]["lr"] = sched.get_last_lr()[0]
    out = []
    for _ in range(n_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_constant_or_cosine():
    tc = load_config(None, ["--train.steps=110", "--train.warmup_steps=10"]).train
    f = lr_lambda(tc, 1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == f(60) == f(109) == 1.0
    tc = load_config(None, ["--train.steps=110", "--train.warmup_steps=10", "--train.schedule=cosine",
                            "--train.min_lr_ratio=0.1"]).train
    f = lr_lambda(tc, 8)  # plain optimiser steps: the world size plays no part
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and all(f(s) >= f(s + 1) for s in range(10, 110))


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("stage_file", STAGE_FILES, ids=lambda p: p.stem)
def test_stage_warmup_is_the_references_at_any_world_size(stage_file, world_size):
    """The reference's constant-with-warmup schedule of 320,000 scheduler steps, advanced by
    accelerate once per process per optimiser step: LR(n) = lr * min(1, n * W / 320000)."""
    tc = load_config(stage_file).train
    assert (tc.warmup_scheduler_steps, tc.warmup_steps, tc.schedule) == (320000, 0, "constant")
    got = lrs_per_step(tc, world_size, 1001)
    for n in (0, 1, 2, 1000):
        assert got[n] == pytest.approx(1e-4 * min(1.0, n * world_size / 320000), rel=1e-12, abs=0)
    assert got[0] == 0.0  # the reference's first step does not move the weights


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_scheduler_step_warmup_reaches_full_lr_after_n_over_w_steps(world_size):
    tc = load_config(None, ["--train.warmup_scheduler_steps=16", "--train.lr=1.0", "--train.steps=100"]).train
    expected = [min(1.0, n * world_size / 16) for n in range(40)]
    assert lrs_per_step(tc, world_size, 40) == pytest.approx(expected, rel=1e-12, abs=0)
    assert expected.index(1.0) == 16 // world_size


def test_a_resume_on_another_world_size_continues_from_the_scheduler_steps_taken():
    """The saved state counts scheduler steps (JSON-safe: the portable checkpoint writes it as
    JSON); the resumed run advances them at its own world size."""
    tc = load_config(None, ["--train.warmup_scheduler_steps=64", "--train.lr=1.0"]).train
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], tc, "cpu")
    sched = build_scheduler(opt, tc, world_size=2)
    for _ in range(3):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["last_epoch"] == 6
    # 3 steps on 2 processes (6 scheduler steps), then 8 processes: 14, 22, ...
    assert lrs_per_step(tc, 8, 3, start=state) == pytest.approx([6 / 64, 14 / 64, 22 / 64], rel=1e-12)
    assert lrs_per_step(tc, 2, 2, start=state) == pytest.approx([6 / 64, 8 / 64], rel=1e-12)


def test_both_warmup_keys_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: got 10 with warmup_scheduler_steps=320000"):
        load_config(None, ["--train.warmup_steps=10", "--train.warmup_scheduler_steps=320000"])
    # a stage file sets warmup_scheduler_steps: asking for plain steps on top needs the other set to 0
    with pytest.raises(ConfigError, match=r"warmup_steps.*warmup_scheduler_steps"):
        load_config(STAGE_FILES[0], ["--train.warmup_steps=10"])
    tc = load_config(STAGE_FILES[0], ["--train.warmup_steps=10", "--train.warmup_scheduler_steps=0"]).train
    assert (tc.warmup_steps, tc.warmup_scheduler_steps) == (10, 0)
    with pytest.raises(ConfigError, match=r"train\.warmup_scheduler_steps: got -1, expected >= 0"):
        load_config(None, ["--train.warmup_scheduler_steps=-1"])


def test_deepspeed_config_follows_our_config():
    cfg = load_config(None, ["--parallel.zero_stage=3", "--parallel.offload_optimizer=true",
                             "--parallel.offload_params=true", "--train.batch_size=2", "--train.grad_accum_steps=4",
                             "--train.grad_clip=0.5"])
    ds = deepspeed_config(cfg.parallel, cfg.train, dp_size=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 64)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    # offload needs DeepSpeed's CPU Adam: still AdamW with METHOD.md's hyper-parameters
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-5,
                                                           "weight_decay": 0.1}}
    assert "optimizer" not in deepspeed_config(load_config(None).parallel, cfg.train, dp_size=1)


@pytest.mark.parametrize("device_type, fused", [("cuda", True), ("npu", None), ("cpu", None)])
def test_adamw_is_fused_on_cuda_only(device_type, fused):
    # NPU: torch_npu has its own fused optimisers; torch's fused AdamW is CUDA-only
    assert adamw_kwargs(device_type).get("fused") is fused


def test_build_optimizer_asks_for_the_device_it_is_given(monkeypatch):
    seen = []
    monkeypatch.setattr("pretrain.training.optimizer.adamw_kwargs", lambda t: seen.append(t) or {})
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], load_config(None).train, "cpu")
    assert seen == ["cpu"] and not opt.defaults.get("fused")
    # the caller's word, not a guess from the parameters (which sit on the CPU here)
    build_optimizer([torch.nn.Parameter(torch.zeros(1))], load_config(None).train, "npu")
    assert seen == ["cpu", "npu"]

