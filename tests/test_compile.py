"""`train.compile`: per-block torch.compile (inductor) of the debug model trains as eager does.

Twenty AdamW steps, each with its own random clip partition (so the sequence
length changes from step to step), under activation checkpointing as the
Trainer applies it: losses and final weights match eager within float32
tolerance, parameter names are unchanged, and dynamo compiles a bounded number
of graphs however many lengths it sees (attention is left out of the graphs).
"""
from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from data.batch import Batch
from data.stage import random_partition
from jobconfig.loader import load_config
from pretrain.model.videogpt import build_model
from pretrain.training.objective import next_clip_loss, row_seed
from pretrain.training.optimizer import build_optimizer
from pretrain.training.parallelize import CompiledForward, apply_compile, parallelize

STEPS = 20
FRAMES = (3, 4, 5)  # frames per row, alternating: lengths vary with this and with the clip partition


def make_model(cfg):
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():  # the output layer starts at zero: give the backbone gradients from step one
        g = torch.Generator().manual_seed(1)
        for p in model.final_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batches(cfg):
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    c, hw = cfg.model.latent_channels, 4
    for step in range(STEPS):
        frames = FRAMES[step % len(FRAMES)]
        yield step, Batch(torch.randn(1, frames, c, hw, hw, generator=g), [[list(random_partition(frames, rng))]])


def train(model, cfg) -> tuple[list[float], set[int]]:
    opt = build_optimizer(model.parameters(), cfg.train, next(model.parameters()).device.type)
    losses, lengths = [], set()
    for step, batch in batches(cfg):
        lengths.add(model.sequence(batch.clips, (4, 4)).sample_id.shape[1])
        loss = next_clip_loss(model, batch, cfg.objective, [row_seed(0, step)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, lengths


@pytest.mark.slow  # inductor compiles a handful of graphs: about a minute on 2 cores
def test_compiled_blocks_train_as_eager():
    cfg = load_config(None, ["--model.attention=blockwise", "--parallel.activation_checkpointing=true",
                             "--train.compile=true", "--train.lr=1e-3", "--train.weight_decay=0"])
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = make_model(cfg), make_model(cfg)
    keys = list(compiled.state_dict())
    parallelize(eager, cfg.parallel, None)
    parallelize(compiled, cfg.parallel, None, compile=cfg.train.compile)
    assert all(isinstance(b.forward.inner, CompiledForward) for b in compiled.backbone.layers)
    assert list(compiled.state_dict()) == keys  # checkpoints and exports see the plain names

    losses_e, lengths = train(eager, cfg)
    losses_c, _ = train(compiled, cfg)
    assert len(lengths) >= 4, lengths
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-4, atol=1e-6)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5, msg=name)
    # the two graphs of a block (before and after attention), static on the first length and
    # symbolic from the second, shared by the blocks: a handful, not one per length or per layer
    graphs = counters["stats"]["unique_graphs"]
    print(f"lengths {sorted(lengths)}: {graphs} graphs compiled")
    assert 0 < graphs <= 8, graphs


@pytest.mark.slow  # inductor compiles the blocks
def test_compile_without_checkpointing_is_idempotent_and_exact():
    cfg = load_config(None, ["--model.attention=blockwise"])
    eager, compiled = make_model(cfg), make_model(cfg)
    apply_compile(apply_compile(compiled))  # twice: one wrapper per block
    for block in compiled.backbone.layers:
        assert isinstance(block.forward, CompiledForward) and not isinstance(block.forward.inner, CompiledForward)
    _, batch = next(batches(cfg))
    with torch.no_grad():
        out_e = next_clip_loss(eager, batch, cfg.objective, [row_seed(0, 0)])
        out_c = next_clip_loss(compiled, batch, cfg.objective, [row_seed(0, 0)])
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
