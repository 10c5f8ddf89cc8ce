"""Weighted blends of datasets (data/blend.py; issue 26, acceptance 3), on real tar shards.

Two toy datasets of different latent sizes, the second with videos too short for the stage (known
skips), blended 3:1: the per-source counts follow the weights within the schedule's stated bound;
resume at a random step, also from 2 to 3 data-parallel ranks (simulated in process, as the loader
tests do), serves exactly the batches of the uninterrupted run; every skip names its source; a
`data.sources` of one entry is `data.root`, batch for batch; config and preflight name the bad entry.
"""
from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from data.blend import Blend, Mixture, describe_line, integer_weights, open_blend
from data.sources import LatentSource
from data.synthetic.shards import video_of, write_toy_dataset
from jobconfig.curriculum import plan_stages
from jobconfig.data import DataConfig, SourceConfig, StageSamplingConfig
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from orchestration.preflight import check_train

CHI2_999_DF1 = 10.828  # the 0.999 quantile of chi-square with 1 degree of freedom
SHORT_B = {v for v in range(14) if v % 5 == 0}  # videos of b with 2 frames: too short for 4 frames


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("blend")
    a, b = str(base / "a"), str(base / "b")
    write_toy_dataset(a, [7, 5, 8, 6, 4], frames=[6 + v % 3 for v in range(30)], shape=(4, 4, 4))
    write_toy_dataset(b, [5, 3, 6], frames=[2 if v in SHORT_B else 7 for v in range(14)], shape=(4, 4, 6))
    return a, b


def blend_cfg(roots, weights=(3, 1), **kw) -> DataConfig:
    stage = StageSamplingConfig(frames=4, interval="random", interval_min=1, interval_max=2, clips="random",
                                patch_size=2)
    sources = [SourceConfig(root=r, weight=w, name=n) for r, w, n in zip(roots, weights, "ab")]
    base = {"root": None, "sources": sources, "seed": 7, "shuffle_buffer": 3, "batch_size": 4, "stage": stage}
    return DataConfig(**{**base, **kw})


def check_content(source: int, batch) -> None:
    """Every frame is its own video's stored frame (v * 1000 + t), at the source's latent size."""
    assert tuple(batch.latents.shape[-2:]) == ((4, 4), (4, 6))[source] or not batch.clips
    for r, row in enumerate(batch.clips):
        (clips,) = row
        want = torch.tensor([video_of(batch.keys[r][0]) * 1000 + t for t in batch.frame_indices[r][0]],
                            dtype=torch.float32)
        assert torch.equal(batch.latents[r, :sum(clips), 0, 0, 0], want)


def steps_of(blends: list[Blend], n: int) -> list[tuple[int, list]]:
    """n global steps of the ranks' blends: (source, every rank's samples and skips, sorted)."""
    out = []
    for _ in range(n):
        step = [b.next() for b in blends]
        assert len({i for i, _ in step}) == 1, "every rank serves the same source at a step"
        for i, batch in step:
            check_content(i, batch)
        items = sorted([s for _, b in step for s in b.samples()] + [("skip", g, why) for _, b in step
                                                                    for g, _, why in b.skipped], key=str)
        out.append((step[0][0], items))
    return out


def test_config_sources_name_the_bad_entry_and_root_is_one_source(tmp_path):
    cfg = load_config(None, ["--data.root=/data/x"]).data
    assert cfg.blend() == [SourceConfig(root="/data/x", weight=1.0)] and cfg.sources == []
    assert load_config(None).data.root == "runs/latents"  # given neither: the default dataset
    ok = load_config(None, ["--data.sources=[{root: /d/a, weight: 3}, {root: /d/b}]"]).data
    assert ok.root is None and [(s.label, s.weight) for s in ok.blend()] == [("a", 3.0), ("b", 1.0)]
    bad = {"[{root: /d/a}, {root: /d/b, weight: -1}]": r"data\.sources\[1\]\.weight: got -1, expected a positive",
           "[{root: /d/a, weight: .inf}]": r"data\.sources\[0\]\.weight: got inf, expected a positive number",
           "[{root: /d/a, weight: 0}]": r"data\.sources\[0\]\.weight: got 0, expected a positive number",
           "[{root: /d/a}, {root: ''}]": r"data\.sources\[1\]\.root: empty",
           "[{root: /d/a}, {root: 'file:///d/a/'}]": r"data\.sources\[1\]\.root: file:///d/a/ is also "
                                                       r"data\.sources\[0\]\.root",
           "[{root: /x/a}, {root: /y/a}]": r"data\.sources\[1\]\.name: 'a' is also the name of data\.sources\[0\]",
           "[{root: /d/a, wieght: 2}]": r"unknown config key 'data\.sources\[0\]\.wieght'"}
    for value, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"--data.sources={value}"])
    with pytest.raises(ConfigError, match=r"data\.root: '/d/r' given together with data\.sources"):
        load_config(None, ["--data.root=/d/r", "--data.sources=[{root: /d/a}]"])
    # per stage: a curriculum changes the mixture between stages; a shared data.root is nulled by a blend
    blend = "{root: null, sources: [{root: /d/main, weight: 3}, {root: /d/extra}]}"
    (tmp_path / "c.yaml").write_text(f"data: {{root: /d/main}}\nstages: [{{train: {{steps: 1}}}}, {{data: {blend}}}]\n")
    plan = plan_stages(str(tmp_path / "c.yaml"), [], None)
    assert [[(s.root, s.weight) for s in cfg.data.blend()] for _, cfg in plan] == \
        [[("/d/main", 1.0)], [("/d/main", 3.0), ("/d/extra", 1.0)]]
    (tmp_path / "c.yaml").write_text("data: {root: /d/main}\nstages: [{data: {sources: [{root: /d/extra}]}}]\n")
    with pytest.raises(ConfigError, match=r"data\.root: '/d/main' given together with data\.sources.*stage 1"):
        plan_stages(str(tmp_path / "c.yaml"), [], None)


def test_mixture_is_a_pure_function_of_the_step_within_its_stated_bound():
    for weights in [(3, 1), (0.7, 0.3), (5, 3, 2), (0.123456789, 1.0)]:
        m = Mixture(weights)
        q, (lo, hi) = [Fraction(w, m.period) for w in m.weights], m.bound()  # exact: 45 * 0.7 < 31.5 in floats
        counts = [0] * len(weights)
        for t in range(4000):
            assert tuple(counts) == m.counts(t)
            assert all(lo <= c - t * qi <= hi for c, qi in zip(counts, q)), (weights, t, counts)
            counts[m.source(t)] += 1
        assert Mixture(weights).source(3999) == m.source(3999)  # no state but the step
    assert integer_weights([0.75, 0.25]) == (3, 1) and Mixture([3, 1]).bound() == (-0.5, 0.5)
    assert sum(integer_weights([0.123456789, 1.0])) == 1 << 16  # rounded past 2^16: still every step assigned


def test_a_3_to_1_blend_of_4000_samples_follows_the_weights(roots):
    blend = open_blend(blend_cfg(roots))  # batch 4 on one rank: 1,000 steps of 4 samples
    per_step, counts = [], [0, 0]
    for t in range(1000):
        i, batch = blend.next()
        counts[i] += len(batch.clips)
        per_step.append(i)
        # the stated bound on every prefix, in steps: |c_i(t) - t * q_i| <= 1/2 for two sources
        assert abs(per_step.count(0) - (t + 1) * 0.75) <= 0.5
    assert dict(blend.drawn) == {"a": counts[0], "b": counts[1]} and sum(counts) == 4000
    expected = (3000, 1000)
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < CHI2_999_DF1 and counts == [3000, 1000]  # deterministic schedule: exact at a period's end
    # each source on its own serves the same batches as a loader of that dataset alone
    alone = open_blend(blend_cfg(roots[1:], weights=(1,)))
    fresh = open_blend(blend_cfg(roots))
    b_steps = [b.samples() for i, b in (fresh.next() for _ in range(40)) if i == 1]
    assert b_steps == [alone.next()[1].samples() for _ in range(len(b_steps))]


def test_resume_at_a_random_step_is_exact(roots):
    rng = random.Random(26)
    k = 4 * rng.randrange(1, 15) + rng.randrange(1, 4)  # inside the mixture's period (4): its phase matters
    cfg = blend_cfg(roots)
    ref = steps_of([open_blend(cfg)], k + 25)
    head = open_blend(cfg)
    assert steps_of([head], k) == ref[:k]
    state = head.state_dict()
    assert state["step"] == k and state["names"] == ["a", "b"] and state["weights"] == [3, 1]
    tail = open_blend(cfg)
    tail.load_state_dict(state)
    assert steps_of([tail], 25) == ref[k:]
    with pytest.raises(ConfigError, match=r"blend state: source weights \[3, 1\] in the checkpoint but \[1, 1\]"):
        open_blend(blend_cfg(roots, weights=(1, 1))).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"one dataset's loader, but this stage blends 2 sources"):
        open_blend(cfg).load_state_dict(open_blend(blend_cfg(roots[:1], weights=(1,))).state_dict())


def test_resume_from_2_to_3_ranks_serves_the_uninterrupted_steps(roots):
    """The global batch stays 12 (2 ranks x 6, then 3 x 4): the steps after the resume hold exactly the
    samples and skips of the uninterrupted 2-rank run's, every rank of a step on the same source."""
    rng = random.Random(3)
    k = 4 * rng.randrange(1, 8) + rng.randrange(1, 4)
    two = blend_cfg(roots, batch_size=6)
    ref = steps_of([open_blend(two, r, 2) for r in range(2)], k + 15)
    head = [open_blend(two, r, 2) for r in range(2)]
    steps_of(head, k)
    state = head[0].state_dict()
    assert head[1].state_dict() == state  # the state does not depend on the rank
    three = [open_blend(blend_cfg(roots, batch_size=4), r, 3) for r in range(3)]
    for b in three:
        b.load_state_dict(state)
    assert steps_of(three, 15) == ref[k:]


def test_every_skip_names_its_source_and_the_buckets_are_reported_per_source(roots):
    blend = open_blend(blend_cfg(roots))
    desc = {d["name"]: d for d in blend.describe()}
    assert desc["a"]["buckets"] == {"4x4": (30, 4)} and desc["a"]["known_skips"] == {}
    assert desc["b"]["buckets"] == {"4x6": (14 - len(SHORT_B), 4)}
    assert desc["b"]["known_skips"] == {"too_short": len(SHORT_B)}
    assert "data source b (" in describe_line(desc["b"]) and "3 known skips (too_short: 3)" in describe_line(desc["b"])
    # 44 steps: 11 of b, 44 samples: 4 of its epochs, whose known skips are each reported once, by name
    reasons = [why for _ in range(44) for _, _, why in blend.next()[1].skipped]
    assert reasons == ["b/too_short"] * 4 * len(SHORT_B) and blend.drawn == {"a": 132, "b": 44}


def test_one_source_is_data_root_batch_for_batch(roots):
    common = ["--train.data=latents", "--data.stage.frames=4", "--data.stage.interval_value=1",
              "--data.batch_size=3", "--model.latent_channels=4", "--data.seed=5"]
    by_root = LatentSource(load_config(None, common + [f"--data.root={roots[1]}"]), 0, 1)
    by_sources = LatentSource(load_config(None, common + [f"--data.sources=[{{root: {roots[1]}}}]"]), 0, 1)
    for _ in range(12):
        (x, rx), (y, ry) = by_root.next_batch(), by_sources.next_batch()
        assert rx == ry and x.samples() == y.samples() and torch.equal(x.latents, y.latents)
        assert x.skipped == y.skipped and all("/" not in why for _, _, why in y.skipped)
    assert by_root.state_dict() == by_sources.state_dict() and by_sources.source_counts() == {}
    again = LatentSource(load_config(None, common + [f"--data.sources=[{{root: {roots[1]}}}]"]), 0, 1)
    again.load_state_dict(by_root.state_dict())  # a data.root checkpoint resumes the one-source blend
    assert again.next_batch()[0].samples() == by_root.next_batch()[0].samples()


def test_latent_source_rows_are_distinct_across_sources_and_counts_are_per_source(roots, tmp_path):
    cfg = load_config(None, ["--train.data=latents", "--data.stage.frames=4", "--data.stage.interval_value=1",
                             "--model.latent_channels=4",
                             f"--data.sources=[{{root: {roots[0]}, weight: 3}}, {{root: {roots[1]}, weight: 1}}]"])
    src = LatentSource(cfg, 0, 1)
    rows = [g for _ in range(8) for g in src.next_batch()[1]]
    assert len(set(rows)) == len(rows) and {g % 2 for g in rows} == {0, 1}  # g * 2 + source
    assert src.source_counts() == {"a": 6, "b": 2} and src.source_counts() == {"a": 0, "b": 0}
    # the preflight checks every source as it checks data.root, naming the bad one
    def plan(frames: int, sources: str):
        return [("stage1", load_config(None, ["--train.data=latents", f"--train.out_dir={tmp_path / 'run'}",
                                              f"--data.stage.frames={frames}", "--data.stage.interval_value=1",
                                              f"--data.sources={sources}"]))]

    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.root: .*nothing does not exist"):
        check_train(plan(4, f"[{{root: {roots[0]}}}, {{root: {tmp_path / 'nothing'}}}]"))
    check_train(plan(7, f"[{{root: {roots[0]}}}, {{root: {roots[1]}, name: bee}}]"))  # a's longest: 8, b's: 7
    with pytest.raises(ConfigError, match=r"stage1: data\.sources\[1\] \(bee\): data\.stage\.frames=8 at"):
        check_train(plan(8, f"[{{root: {roots[0]}}}, {{root: {roots[1]}, name: bee}}]"))
