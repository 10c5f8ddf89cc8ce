"""Acceptance 3 and 5 of the foundation: no information leaks through the whole
model, and bad inputs fail with errors that name the value."""
from __future__ import annotations

import pytest
import torch

from data.batch import Batch
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from jobconfig.train import ObjectiveConfig
from pretrain.model.videogpt import build_model
from pretrain.training.objective import next_clip_loss


def debug_model(backend="blockwise", **overrides):
    cfg = load_config(None, [f"--model.attention={backend}", *[f"--model.{k}={v}" for k, v in overrides.items()]])
    model = build_model(cfg.model, dtype=torch.float64)
    with torch.no_grad():  # the noisy embedder and the DiT head start at zero; make every input matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


CLIPS = [2, 1, 2, 1]


@torch.no_grad()  # FlexAttention has no CPU backward; the leak test needs none
def predict(model, x_noisy, x_clean, t):
    """(x1 prediction [1, F, ...], backbone hidden states [1, L, D], sequence tables)."""
    seq = model.sequence([[CLIPS]], x_noisy.shape[-2:])
    hidden = []
    hook = model.backbone.register_forward_hook(lambda mod, args, out: hidden.append(out))
    try:
        out = model(x_noisy, x_clean, t, seq)
    finally:
        hook.remove()
    return out, hidden[0], seq


def differs(a, b):
    return not torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["blockwise", "dense", "flex"])
def test_no_leak_through_the_model(backend):
    """Clean frame j reaches noisy clip k only if j lies before clip k, and no earlier clean frame;
    a noisy clip reaches nothing but itself."""
    model = debug_model(backend)
    torch.manual_seed(0)
    F = sum(CLIPS)
    x_noisy, x_clean = torch.randn(2, 1, F, 4, 4, 4, dtype=torch.float64)
    t = torch.rand(1, F, dtype=torch.float64)
    base, base_hidden, seq = predict(model, x_noisy, x_clean, t)
    clip_of = [k for k, n in enumerate(CLIPS) for _ in range(n)]
    first_frame = [sum(CLIPS[:k]) for k in range(len(CLIPS))]
    clean_tokens = [(~seq.is_noisy[0] & (seq.frame[0] == f) & (seq.sample_id[0] >= 0)) for f in range(F)]
    for j in range(F):
        pert_clean = x_clean.clone(); pert_clean[:, j] += 1.0
        pert_noisy = x_noisy.clone(); pert_noisy[:, j] += 1.0
        out_c, hidden_c, _ = predict(model, x_noisy, pert_clean, t)
        out_n, _, _ = predict(model, pert_noisy, x_clean, t)
        has_clean_copy = clip_of[j] < len(CLIPS) - 1  # the last clip has no clean copy in the sequence
        for f in range(F):
            k = clip_of[f]
            assert differs(out_c[0, f], base[0, f]) == (has_clean_copy and j < first_frame[k]), \
                f"clean frame {j} -> noisy frame {f} (clip {k})"
            assert differs(out_n[0, f], base[0, f]) == (clip_of[j] == k), f"noisy frame {j} -> noisy frame {f}"
            if has_clean_copy and f < j and clean_tokens[f].any():
                assert not differs(hidden_c[0, clean_tokens[f]], base_hidden[0, clean_tokens[f]]), \
                    f"clean frame {j} -> earlier clean frame {f}"
            if has_clean_copy and f >= j and clean_tokens[f].any():
                assert differs(hidden_c[0, clean_tokens[f]], base_hidden[0, clean_tokens[f]]), \
                    f"clean frame {j} should reach clean frame {f}"


def test_model_is_built_on_meta_then_initialised_deterministically():
    cfg = load_config(None)
    a, b = build_model(cfg.model, seed=3), build_model(cfg.model, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert pa.device.type == "cpu" and torch.equal(pa, pb), name
    assert not torch.equal(a.special_tokens, build_model(cfg.model, seed=4).special_tokens)
    # non-persistent buffers were recomputed after to_empty
    assert torch.isfinite(a.pos_table).all() and a.pos_table.abs().max() <= 1.0
    assert a.backbone.rotary.inv_freq("cpu")[0] == 1.0


def test_bad_inputs_raise_errors_naming_the_value():
    model = debug_model()
    obj = ObjectiveConfig()
    g = [0]
    lat = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"clip sizes sum to \[3\] frames.*latents hold 4"):
        next_clip_loss(model, Batch(lat, [[[1, 2]]]), obj, g)
    with pytest.raises(ConfigError, match=r"sum to 6 frames but latents hold only 4"):
        next_clip_loss(model, Batch(lat, [[[4, 2]]]), obj, g)
    with pytest.raises(ConfigError, match=r"got 3 channels, expected 4"):
        next_clip_loss(model, Batch(lat[:, :, :3], [[[2, 2]]]), obj, g)
    with pytest.raises(ConfigError, match=r"clip sizes \[2, 0, 2\] must be positive"):
        next_clip_loss(model, Batch(lat, [[[2, 0, 2]]]), obj, g)
    short = debug_model(max_tokens=30)
    with pytest.raises(ConfigError, match=r"sequence of 36 tokens exceeds model.max_tokens=30"):
        next_clip_loss(short, Batch(lat, [[[2, 2]]]), obj, g)
