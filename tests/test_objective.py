"""Acceptance 4 of the foundation: the next-clip diffusion objective trains and is exact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.batch import Batch
from data.synthetic.latents import moving_square_latents
from jobconfig.loader import load_config
from pretrain.checkpoint.export import load_export
from pretrain.model.videogpt import build_model
from pretrain.training.objective import add_noise, next_clip_loss, per_frame_clip_t, row_seed

REPO = Path(__file__).resolve().parents[1]


def eval_loss(model, cfg, videos):
    """Loss on fixed moving-square videos with fixed noise: comparable before/after training."""
    layout = [[[2, 3, 1, 2]] for _ in range(len(videos))]
    with torch.no_grad():
        return sum(next_clip_loss(model, Batch(videos, layout), cfg.objective,
                                  [row_seed(1234, 100 * r + i) for i in range(len(videos))]).item()
                   for r in range(4)) / 4


@pytest.mark.slow
def test_200_steps_lower_the_loss_3x_on_moving_squares(tmp_path):
    # the one training path (`vgpt train`, the DeepSpeed Trainer), one process in fp32 as the debug run
    overrides = ["--train.steps=200", "--parallel.precision=fp32", "--parallel.zero_stage=0",
                 "--train.tensorboard=false", f"--train.out_dir={tmp_path}"]
    cfg = load_config(REPO / "configs/debug.yaml", overrides)
    videos = moving_square_latents(cfg.synthetic, cfg.model.latent_channels, seed=cfg.train.seed)
    before = eval_loss(build_model(cfg.model, seed=cfg.train.seed), cfg, videos)
    res = subprocess.run([sys.executable, "-m", "orchestration.cli", "train", "--config",
                          str(REPO / "configs/debug.yaml"), "--resume", "none", *overrides],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = build_model(cfg.model)
    load_export(trained, tmp_path / "export")
    after = eval_loss(trained, cfg, videos)
    assert len(losses) == 200
    assert before / after >= 3.0, f"held-out loss {before:.4f} -> {after:.4f}: only {before / after:.2f}x lower"


def test_t_is_shared_by_the_frames_of_a_clip():
    layout = [[[3, 1, 2]], [[2], [2, 1]]]
    t = per_frame_clip_t(layout, 6, [5, 6])
    assert t.shape == (2, 6)
    assert t[0, 0] == t[0, 1] == t[0, 2] and t[0, 4] == t[0, 5] and len({t[0, 0], t[0, 3], t[0, 4]}) == 3
    assert t[1, 0] == t[1, 1] and t[1, 2] == t[1, 3] and t[1, 5] == 1.0  # padding frame
    assert ((t >= 0) & (t <= 1)).all()
    # and add_noise applies exactly that t: x_t = t*x1 + (1-t)*eps, so x_t - t*x1 is pure noise
    x1 = torch.randn(2, 6, 4, 2, 2)
    noised = add_noise(Batch(x1, layout), load_config(None).objective, [5, 6])
    assert torch.equal(noised.t, t)
    # context copies use t_ctx in [0.9, 1]: they stay much closer to x1 than the noisy copies
    assert (noised.x_clean - x1).abs().mean() < (noised.x_noisy - x1).abs().mean()


def test_padding_never_contributes_to_the_loss():
    cfg = load_config(None, ["--model.attention=blockwise"])
    model = build_model(cfg.model, dtype=torch.float64)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 5, 4, 4, 4, dtype=torch.float64)
    layout = [[[2, 3]], [[1, 2]]]  # row 1 has 2 padding frames

    def loss_and_grads(latents):
        model.zero_grad()
        loss = next_clip_loss(model, Batch(latents, layout), cfg.objective, [7, 8])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(x)
    garbage = x.clone()
    garbage[1, 3:] = 1e3
    loss_b, grads_b = loss_and_grads(garbage)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # while real frames do count
    changed = x.clone()
    changed[1, 2] += 1.0
    assert not torch.equal(loss_and_grads(changed)[0], loss_a)


def test_a_rows_noise_depends_only_on_its_seed():
    """Noise is per sample, not per batch: the basis of DP parity and exact resume."""
    cfg = load_config(None).objective
    x = torch.randn(3, 4, 4, 2, 2)
    layout = [[[2, 2]], [[1, 3]], [[4]]]
    whole = add_noise(Batch(x, layout), cfg, [11, 12, 13])
    alone = add_noise(Batch(x[1:2], layout[1:2]), cfg, [12])
    assert torch.equal(whole.x_noisy[1], alone.x_noisy[0]) and torch.equal(whole.t[1], alone.t[0])
    assert row_seed(0, 5) != row_seed(0, 6) and row_seed(0, 5) == row_seed(0, 5) != row_seed(1, 5)
