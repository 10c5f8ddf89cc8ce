"""Video prediction (issue 9, acceptance 1 and 4): KV-cached generation equals
generation that recomputes the whole sequence at every Euler step; guidance,
the sliding window and bad inputs behave as METHOD.md says."""
from __future__ import annotations

import pytest
import torch

from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig
from jobconfig.predict import PredictConfig
from pretrain.inference.sampler import NextClipPredictor
from pretrain.model.videogpt import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(attention="blockwise"))
    with torch.no_grad():  # the DiT head starts at zero; random weights make every input matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def generate(model, context, frames, **cfg):
    cfg.setdefault("clip_frames", 1)
    cfg.setdefault("max_frame_window", 80)
    predictor = NextClipPredictor(model, PredictConfig(steps=cfg.pop("steps", 4), **cfg))
    return predictor.predict(context, frames), predictor.stats


@pytest.mark.parametrize("clip_frames,window,guidance", [
    (1, 80, 1.5),   # next-frame, the window never slides: the cache grows clip by clip
    (2, 6, 1.5),    # the window slides at every clip: the cache is rebuilt each time
    (3, 7, 1.0),    # no guidance, a partial first context clip, a mix of appends and rebuilds
])
def test_kv_cache_generation_equals_recompute(model, clip_frames, window, guidance):
    context = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cached, stats = generate(model, context, 7, clip_frames=clip_frames, max_frame_window=window,
                             guidance=guidance, kv_cache=True)
    full, _ = generate(model, context, 7, clip_frames=clip_frames, max_frame_window=window,
                       guidance=guidance, kv_cache=False)
    assert cached.shape == (7, 4, 8, 8)
    assert cached.abs().mean() > 0.1  # a real prediction, not a zero tensor
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert stats.cache_rebuilds >= 1
    if window >= 5 + 7:
        assert stats.cache_rebuilds == 1 and stats.cache_appends == 6  # frame by frame, never rebuilt
    if window == 6:
        assert stats.cache_rebuilds == 4  # slid at every one of the 4 generated clips


@pytest.mark.parametrize("clip_frames,window", [(2, 80), (2, 6)])
def test_kv_cache_equals_recompute_when_the_history_is_refreshed_every_clip(model, clip_frames, window):
    """predict.history: reencode hands the sampler new latents for the window before every clip after the
    first: the cache is rebuilt then (stale keys/values never used), and shared by the clip's Euler steps."""
    calls = []

    def refresh(history, start, clip):
        calls.append((len(history), start, clip))
        return history[start:] * 0.8 + 0.1 * clip  # a change the model sees

    context = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    results = {}
    for kv in (True, False):
        predictor = NextClipPredictor(model, PredictConfig(steps=3, clip_frames=clip_frames, max_frame_window=window,
                                                           kv_cache=kv))
        results[kv] = predictor.predict(context, 6, refresh), predictor.stats
    (cached, stats), (full, _) = results[True], results[False]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert (stats.cache_rebuilds, stats.cache_appends, stats.model_calls) == (3, 0, 3 * 3)
    first = [max(0, h - (window - clip_frames)) for h in (6, 8)]
    assert calls == [(6, first[0], 1), (8, first[1], 2)] * 2  # clips 1 and 2, for each of the two runs
    plain, _ = generate(model, context, 6, clip_frames=clip_frames, max_frame_window=window, steps=3)
    torch.testing.assert_close(cached[:clip_frames], plain[:clip_frames], rtol=1e-5, atol=1e-5)
    assert (cached[clip_frames:] - plain[clip_frames:]).abs().max() > 1e-3  # the refreshed history mattered


def test_noise_is_reseeded_per_clip_as_the_reference_does_or_seeded_per_clip(model):
    same = NextClipPredictor(model, PredictConfig(seed=3))
    a, b = same.noise(0, 2, (4, 8, 8)), same.noise(1, 2, (4, 8, 8))
    g = torch.Generator().manual_seed(3)  # the reference: Generator().manual_seed(seed), one [1, C, h, w] per frame
    assert torch.equal(a, b) and torch.equal(a, torch.cat([torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)]))
    per_clip = NextClipPredictor(model, PredictConfig(seed=3, noise_seed="per_clip"))
    assert not torch.equal(per_clip.noise(0, 2, (4, 8, 8)), per_clip.noise(1, 2, (4, 8, 8)))


def test_guidance_zero_ignores_the_context_and_guidance_uses_it(model):
    a = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    b = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    uncond_a, _ = generate(model, a, 2, guidance=0.0)
    uncond_b, _ = generate(model, b, 2, guidance=0.0)
    # only the first clip is purely unconditional; the second has generated history
    torch.testing.assert_close(uncond_a[:1], uncond_b[:1], rtol=0, atol=1e-6)
    guided_a, _ = generate(model, a, 1, guidance=1.5)
    guided_b, _ = generate(model, b, 1, guidance=1.5)
    assert (guided_a - guided_b).abs().max() > 1e-3


def test_frames_older_than_the_window_do_not_matter(model):
    g = torch.Generator().manual_seed(4)
    recent = torch.randn(3, 4, 8, 8, generator=g)
    old_a, old_b = torch.randn(2, 3, 4, 8, 8, generator=g)
    out_a, _ = generate(model, torch.cat([old_a, recent]), 1, max_frame_window=4)
    out_b, _ = generate(model, torch.cat([old_b, recent]), 1, max_frame_window=4)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)
    wide_a, _ = generate(model, torch.cat([old_a, recent]), 1, max_frame_window=8)
    wide_b, _ = generate(model, torch.cat([old_b, recent]), 1, max_frame_window=8)
    assert (wide_a - wide_b).abs().max() > 1e-4


def test_the_last_euler_step_lands_on_the_models_x1():
    m = build_model(ModelConfig(attention="blockwise")).eval()  # zero-initialised head: x1_hat == 0
    out, stats = generate(m, torch.randn(2, 4, 8, 8), 2, steps=7)
    assert torch.equal(out, torch.zeros_like(out))
    assert stats.model_calls == 2 * 7


def test_same_seed_same_frames_other_seed_other_frames(model):
    ctx = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a, _ = generate(model, ctx, 2, seed=0)
    b, _ = generate(model, ctx, 2, seed=0)
    c, _ = generate(model, ctx, 2, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_inputs_are_named(model):
    with pytest.raises(ConfigError, match="latent_channels=4"):
        generate(model, torch.randn(2, 3, 8, 8), 1)
    with pytest.raises(ConfigError, match="patch_size=2"):
        generate(model, torch.randn(2, 4, 7, 8), 1)
    with pytest.raises(ConfigError, match="max_frame_window"):
        PredictConfig(clip_frames=4, max_frame_window=4).validate()
