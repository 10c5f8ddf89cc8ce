"""The LR schedule and the DeepSpeed config generated from our config tree."""
import math

import pytest

from jobconfig.loader import load_config
from parallel.engine import deepspeed_config
from pretrain.training.optimizer import lr_lambda


def test_warmup_then_constant_or_cosine():
    tc = load_config(None, ["--train.steps=110", "--train.warmup_steps=10"]).train
    f = lr_lambda(tc)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == f(60) == f(109) == 1.0
    tc = load_config(None, ["--train.steps=110", "--train.warmup_steps=10", "--train.schedule=cosine",
                            "--train.min_lr_ratio=0.1"]).train
    f = lr_lambda(tc)
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and all(f(s) >= f(s + 1) for s in range(10, 110))


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
