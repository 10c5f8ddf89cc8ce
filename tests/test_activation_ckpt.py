"""Activation checkpointing recomputes blocks in backward: same loss, same gradients."""
import torch

from data.batch import Batch
from jobconfig.loader import load_config
from pretrain.model.videogpt import build_model
from pretrain.training import parallelize
from pretrain.training.objective import next_clip_loss
from pretrain.training.parallelize import apply_activation_checkpointing


def grads(model, batch, cfg):
    model.zero_grad()
    loss = next_clip_loss(model, batch, cfg.objective, [1, 2])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_identical_gradients():
    cfg = load_config(None, ["--model.attention=blockwise"])
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
    batch = Batch(torch.randn(2, 4, 4, 4, 4), [[[1, 3]], [[2, 2]]])
    loss_a, g_a = grads(model, batch, cfg)
    apply_activation_checkpointing(model)
    calls = []
    inner = parallelize.checkpoint
    parallelize.checkpoint = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        loss_b, g_b = grads(model, batch, cfg)
    finally:
        parallelize.checkpoint = inner
    assert len(calls) == cfg.model.num_layers
    assert torch.equal(loss_a, loss_b)
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=1e-6, atol=1e-7)
