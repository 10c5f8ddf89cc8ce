"""Activation checkpointing recomputes blocks in backward: same loss, same gradients."""
import torch

from orchestration.config import load_config
from parallel.engine import apply_activation_checkpointing
from pretrain.layout import Batch
from pretrain.model import build_model
from pretrain.objective import next_clip_loss


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
    inner = model.backbone.checkpoint_fn
    model.backbone.checkpoint_fn = lambda *a: calls.append(1) or inner(*a)
    loss_b, g_b = grads(model, batch, cfg)
    assert len(calls) == cfg.model.num_layers
    assert torch.equal(loss_a, loss_b)
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=1e-6, atol=1e-7)
