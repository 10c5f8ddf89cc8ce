"""Acceptance 4 of the foundation: the next-clip diffusion objective trains and is exact."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.batch import Batch
from data.synthetic.latents import moving_square_latents
from data.synthetic.shards import write_toy_dataset
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from pretrain.checkpoint.export import load_export
from pretrain.model.videogpt import build_model
from pretrain.training.objective import add_noise, next_clip_loss, per_frame_clip_t, posterior_draws, row_seed
from tests.runs import env

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
                         capture_output=True, text=True, timeout=900, cwd=REPO, env=env())
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


# ---------------------------------------------------------------- posterior-form batches (issue 29)
def exact_context(cfg):
    """The objective with t_ctx = 1: the clean context copy is then its posterior draw itself."""
    return dataclasses.replace(cfg, context_noise_min=1.0)


def test_posterior_draws_have_its_mean_and_std_and_are_fresh_and_independent():
    """Over many epochs of one sample, the noisy target's x1 and the clean context copy are draws of
    the stored posterior (mean, std), independent of each other and of the previous epoch's."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 3, 2, 2, 2, generator=g)
    std = 0.1 + torch.rand(1, 3, 2, 2, 2, generator=g)
    N, p, epochs = 29, 5, 2000  # sample p of a 29-sample dataset: global index epoch * N + p
    seeds = [row_seed(7, e * N + p) for e in range(epochs)]
    layout = [[[1, 2]]] * epochs
    batch = Batch(torch.cat([mean, std], 2).expand(epochs, -1, -1, -1, -1), layout, moments=True)
    noised = add_noise(batch, exact_context(load_config(None).objective), seeds)
    assert noised.x1.shape == noised.x_clean.shape == (epochs, 3, 2, 2, 2)
    z1, z2 = (noised.x1 - mean) / std, (noised.x_clean - mean) / std  # standard normal if drawn right
    tol = 4.5 / epochs ** 0.5  # 4.5 standard errors of a mean (of a std: 1 / sqrt(2 n))
    for z in (z1, z2):
        assert z.mean(0).abs().max() < tol  # the posterior's mean ...
        assert (z.std(0) - 1).abs().max() < tol / 2 ** 0.5  # ... and std
    assert (z1 * z2).mean(0).abs().max() < tol  # the two copies are independent draws
    assert (z1[1:] * z1[:-1]).mean(0).abs().max() < tol  # a fresh draw every epoch
    # the noisy copy is x_t = t * x1 + (1 - t) * eps with the t and eps a single-draw batch gets
    k = 100
    zeros = add_noise(Batch(torch.zeros(k, 3, 2, 2, 2), layout[:k]), load_config(None).objective, seeds[:k])
    assert torch.equal(noised.t[:k], zeros.t)
    torch.testing.assert_close(noised.x_noisy[:k], noised.t[:k, :, None, None, None] * noised.x1[:k] + zeros.x_noisy)


def test_a_posterior_without_spread_trains_exactly_as_its_mean():
    """The draws leave the single-draw path's randomness alone: std 0 gives the sample-form batch's bits."""
    cfg = load_config(None, ["--model.attention=blockwise"])
    model = build_model(cfg.model, dtype=torch.float64)
    mean = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    layout = [[[1, 3]], [[2, 1]]]
    single, post = Batch(mean, layout), Batch(torch.cat([mean, torch.zeros_like(mean)], 2), layout, moments=True)
    a, b = add_noise(single, cfg.objective, [3, 4]), add_noise(post, cfg.objective, [3, 4])
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_noisy", "x_clean", "t", "x1"))
    assert torch.equal(next_clip_loss(model, single, cfg.objective, [3, 4]),
                       next_clip_loss(model, post, cfg.objective, [3, 4]))
    with pytest.raises(ConfigError, match="4 channels of posterior moments, expected 8"):
        next_clip_loss(model, Batch(post.latents[:, :, :4], layout, moments=True), cfg.objective, [3, 4])


@pytest.mark.parametrize("form", ["posterior", "sample", None])
def test_datasets_of_either_form_train_and_a_resume_on_another_world_size_replays_the_draws(tmp_path, form):
    """Through the trainer's data source (data/sources.py: loader, row indexes): a posterior-form dataset
    gives moments batches whose draws depend only on (run seed, global index), so the rows a run resumed
    on 2 ranks serves get the draws the uninterrupted 1-rank run gave them; a `sample` dataset, and one
    of before the field, train as before."""
    from data.sources import make_source

    write_toy_dataset(str(tmp_path), [3, 2], frames=8, shape=(2, 4, 6), latent_form=form)
    cfg = load_config(None, ["--train.data=latents", f"--data.root={tmp_path}", "--data.stage.frames=2",
                             "--data.stage.interval_value=1", "--data.batch_size=2", "--train.batch_size=2",
                             "--model.latent_channels=2", "--model.attention=blockwise"])
    objective = exact_context(cfg.objective)

    def draws(src, steps):
        out = {}
        for _ in range(steps):
            batch, rows = src.next_batch()
            assert batch.moments == (form == "posterior") and batch.latents.shape[2] == (4 if batch.moments else 2)
            noised = add_noise(batch, objective, [row_seed(cfg.train.seed, g) for g in rows])
            out.update({g: (noised.x1[r], noised.x_clean[r]) for r, g in enumerate(rows)})
        return out

    one = make_source(cfg, 0, 1)
    ref = draws(one, 6)  # 12 rows of a 5-sample dataset: every sample in 3 epochs
    model = build_model(cfg.model)
    batch, rows = one.next_batch()
    loss = next_clip_loss(model, batch, cfg.objective, [row_seed(cfg.train.seed, g) for g in rows])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert tuple(one.placeholder().latents.shape[2:]) == (2, 4, 6)  # a zero-weight step's batch: model channels
    if form != "posterior":
        return
    head = make_source(cfg, 0, 1)
    draws(head, 2)
    two = [make_source(cfg, r, 2) for r in range(2)]
    resumed = {}
    for src in two:
        src.load_state_dict(head.state_dict())
        resumed.update(draws(src, 2))
    assert sorted(resumed) == sorted(ref)[4:]
    for g, (x1, ctx) in resumed.items():
        assert torch.equal(x1, ref[g][0]) and torch.equal(ctx, ref[g][1])
        assert not torch.equal(x1, ctx)


def test_a_batch_of_two_rows_trains_as_the_rows_one_at_a_time():
    """Acceptance 4: batch 2 per device = batch 1 twice (same row seeds): the loss is the mean of the rows'
    losses and so is the gradient, for rows of different clip layouts and lengths (the shorter row
    padded to the longer's 5 frames draws exactly what it draws alone)."""
    cfg = load_config(None, ["--model.attention=blockwise"])
    model = build_model(cfg.model, dtype=torch.float64)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    moments = torch.cat([torch.randn(2, 5, 4, 4, 4, generator=g, dtype=torch.float64),
                         0.2 * torch.rand(2, 5, 4, 4, 4, generator=g, dtype=torch.float64)], 2)
    moments[1, 3:] = 0  # row 1 has 3 frames, padded to 5
    layout, seeds = [[[2, 3]], [[1, 2]]], [row_seed(3, 40), row_seed(3, 41)]

    def loss_and_grads(rows):
        model.zero_grad()
        frames = max(sum(map(sum, layout[r])) for r in rows)
        loss = next_clip_loss(model, Batch(moments[rows, :frames], [layout[r] for r in rows], moments=True),
                              cfg.objective, [seeds[r] for r in rows])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    # a padded row's posterior draws and noise are the ones it gets alone (drawn over its own frames)
    alone = posterior_draws(moments[1:, :3], seeds[1:])[0]
    padded = posterior_draws(moments[1:], seeds[1:], [3])[0]
    assert torch.equal(padded[:, :3], alone) and not padded[:, 3:].any()
    noised_alone = add_noise(Batch(moments[1:, :3], layout[1:], moments=True), cfg.objective, seeds[1:])
    noised_both = add_noise(Batch(moments, layout, moments=True), cfg.objective, seeds)
    for name in ("x_noisy", "x_clean", "t", "x1"):
        assert torch.equal(getattr(noised_both, name)[1, :3], getattr(noised_alone, name)[0]), name
    both, grads = loss_and_grads([0, 1])
    (l0, g0), (l1, g1) = loss_and_grads([0]), loss_and_grads([1])
    torch.testing.assert_close(both, (l0 + l1) / 2, rtol=1e-6, atol=0)  # the MSE is taken in fp32
    for a, b0, b1 in zip(grads, g0, g1):
        torch.testing.assert_close(a, (b0 + b1) / 2, rtol=1e-6, atol=1e-12)
