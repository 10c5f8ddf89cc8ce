"""Acceptance 5: per-stage sample construction follows METHOD.md's table, for the 4
stage configs in configs/stages/ (property tests over many seeds and video lengths)."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.stage import interval_bounds, plan_sample, sample_rng, sample_tokens
from jobconfig.loader import CONFIG_ROOT, load_config

# METHOD.md, "The four curriculum stages": frames, interval (fixed d or random [lo, hi]), clips, token limit
TABLE = {
    1: dict(frames=16, interval=("fixed", 4), clips="single_frame"),
    2: dict(frames=48, interval=("fixed", 4), clips="random"),
    3: dict(frames=48, interval=("random", 4, 12), clips="random"),
    4: dict(frames=80, interval=("random", 4, 12), clips="random", max_tokens=1_280_000),
}
STAGES = {n: load_config(CONFIG_ROOT / "stages" / f"stage{n}.yaml").data.stage for n in TABLE}


@pytest.mark.parametrize("n", sorted(TABLE))
def test_stage_yaml_matches_the_method_table(n):
    cfg, row = STAGES[n], TABLE[n]
    assert cfg.frames == row["frames"] and cfg.clips == row["clips"]
    if row["interval"][0] == "fixed":
        assert (cfg.interval, cfg.interval_value) == row["interval"]
    else:
        assert (cfg.interval, cfg.interval_min, cfg.interval_max) == row["interval"]
    if "max_tokens" in row:
        assert cfg.max_tokens == row["max_tokens"]


@given(stage=st.sampled_from(sorted(TABLE)), T=st.integers(1, 1200), seed=st.integers(0, 2**62),
       epoch=st.integers(0, 50), pos=st.integers(0, 10**9))
@settings(max_examples=400, deadline=None, database=None)
def test_samples_follow_the_stage_rules(stage, T, seed, epoch, pos):
    cfg, row = STAGES[stage], TABLE[stage]
    F = row["frames"]
    plan = plan_sample(cfg, T, sample_rng(seed, epoch, pos))
    if row["interval"][0] == "fixed":
        lo = hi = row["interval"][1]
    else:
        lo, hi = row["interval"][1], min(row["interval"][2], (T - 1) // (F - 1))
    if hi < lo or T < (F - 1) * lo + 1:
        assert plan is None, f"a {T}-frame video cannot give {F} frames at interval >= {lo}: must be skipped"
        return
    assert plan is not None
    assert lo <= plan.interval <= hi
    f = plan.frame_indices
    assert len(f) == F and f[0] >= 0 and f[-1] <= T - 1
    assert all(b - a == plan.interval for a, b in zip(f, f[1:]))
    assert sum(plan.clips) == F and all(c >= 1 for c in plan.clips)
    if row["clips"] == "single_frame":
        assert plan.clips == (1,) * F
    else:
        assert 2 <= len(plan.clips) <= F
    # the same (seed, epoch, position) always gives the same sample
    assert plan == plan_sample(cfg, T, sample_rng(seed, epoch, pos))


@pytest.mark.parametrize("stage", [2, 3, 4])
def test_random_partitions_cover_the_whole_range_of_clip_counts(stage):
    """K ~ U{2..F}: over many seeds both ends are reached and no K is much more frequent."""
    cfg = STAGES[stage]
    F = cfg.frames
    ks = Counter(len(plan_sample(cfg, 2000, sample_rng(7, 0, p)).clips) for p in range(4000))
    assert set(ks) <= set(range(2, F + 1))
    assert min(ks) <= 3 and max(ks) >= F - 1
    assert max(ks.values()) < 4000 / (F - 1) * 2.5  # roughly uniform, no collapse onto a few K
    cuts = Counter(c for p in range(400) for c in _cuts(plan_sample(cfg, 2000, sample_rng(3, 1, p)).clips))
    assert set(cuts) == set(range(1, F))  # every cut point gets used


def _cuts(clips):
    out, acc = [], 0
    for c in clips[:-1]:
        acc += c
        out.append(acc)
    return out


@pytest.mark.parametrize("stage", [3, 4])
def test_flexible_interval_spans_lo_to_min_hi_and_fit(stage):
    cfg = STAGES[stage]
    F = cfg.frames
    for fit in (4, 7, 12, 20):  # (T-1)//(F-1) == fit
        T = fit * (F - 1) + 1
        ds = Counter(plan_sample(cfg, T, sample_rng(0, 0, p)).interval for p in range(600))
        assert set(ds) == set(range(4, min(12, fit) + 1))
        assert interval_bounds(cfg, T) == (4, min(12, fit))
    assert plan_sample(cfg, 3 * (F - 1) + 1, sample_rng(0, 0, 0)) is None  # fit 3 < lo 4: too short


def test_stage4_token_count_is_what_the_model_sees():
    cfg = STAGES[4]
    # 80 single-frame clips of a 22x40 latent: 80 noisy + 79 clean frames of 220+2 tokens
    assert sample_tokens(cfg, (1,) * 80, (22, 40)) == 80 * 222 + 79 * 222
    assert sample_tokens(cfg, (80,), (22, 40)) == 80 * 222


def test_bad_data_config_names_the_key():
    from jobconfig.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.corrupt_shards: got 'maybe', expected one of \['skip', 'fail'\]"):
        load_config(None, ["--data.corrupt_shards=maybe"])
    with pytest.raises(ConfigError, match=r"data.stage.interval_max: got 2, expected >= interval_min=4"):
        load_config(CONFIG_ROOT / "stages" / "stage3.yaml", ["--data.stage.interval_max=2"])
    with pytest.raises(ConfigError, match=r"data.stage.frames: got 1, clips=random needs at least 2 frames"):
        load_config(None, ["--data.stage.frames=1", "--data.stage.clips=random"])
