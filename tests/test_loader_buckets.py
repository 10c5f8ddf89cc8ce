"""Shape buckets and early filtering on real shards (issue 19, acceptance 3 and 4).

The toy dataset has videos of three aspect ratios (latent 4x4, 4x6 and 6x4) in
mixed shards, and a few videos too short for the stage, all recorded in
index.json. Every batch must hold one latent shape; one epoch serves every
usable sample once and reports every short one once, across 1, 2 and 3 ranks;
a resume on another world size continues every bucket's stream exactly; and a
short video is skipped without its shard being opened.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from data.loader import LatentLoader
from data.order import Schedule, progress, reader_items
from data.synthetic.shards import video_of, write_toy_dataset
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError
from tests.test_loader_order import cursors_after
from tests.test_loader_stream import check_content

SIZES = [5, 4, 6, 3, 6, 4]  # 28 videos, shapes mixed within shards
N = sum(SIZES)
SHAPES = [[(1, 4, 4), (1, 4, 6), (1, 6, 4)][(v * 5) % 7 % 3] for v in range(N)]
SHORT = {3, 11, 20}
LENGTHS = [3 if v in SHORT else 6 + (v * 7) % 9 for v in range(N)]
USABLE = set(range(N)) - SHORT


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("buckets"))
    write_toy_dataset(path, SIZES, frames=LENGTHS, shape=SHAPES)
    return path


def make_cfg(root, **kw) -> DataConfig:
    stage = StageSamplingConfig(frames=4, interval="random", interval_min=1, interval_max=2, clips="random",
                                patch_size=2)
    return DataConfig(**{**dict(root=root, seed=5, shuffle_buffer=3, num_streams=6, batch_size=2, epochs=1,
                                stage=stage), **kw})


def run(cfg, W, steps=None, states=None):
    """Per rank: [(shape, [(epoch, key)], [skipped (global index, reason)])] per step; and the loaders."""
    loaders = [LatentLoader(cfg, r, W) for r in range(W)]
    for ld in loaders:
        if states:
            ld.load_state_dict(states)
    out = []
    for ld in loaders:
        steps_out = []
        for b in itertools.islice(ld, steps):
            check_content(b)
            steps_out.append((tuple(b.latents.shape[2:]) if b.clips else None,
                              [(g // N, key) for g, key, *_ in b.samples()], [(g, r) for g, _, r in b.skipped]))
        out.append(steps_out)
    return out, loaders


def shape_of(key):
    return SHAPES[video_of(key)][1:]


@pytest.mark.parametrize("W", [1, 2, 3])
def test_batches_hold_one_shape_and_an_epoch_serves_every_sample_once(root, W):
    per_rank, loaders = run(make_cfg(root, num_workers=1 if W == 2 else 0), W)
    assert len({len(s) for s in per_rank}) == 1, "every rank takes the same number of steps"
    served, skipped = [], []
    for steps in per_rank:
        for shape, samples, skips in steps:
            assert {shape_of(k) for _, k in samples} <= {shape[-2:]} if samples else True
            served += samples
            skipped += skips
    for t in range(len(per_rank[0])):  # a step is one bucket on every rank
        assert len({shape_of(k) for steps in per_rank for _, k in steps[t][1]}) == 1
    epoch0 = sorted(video_of(k) for e, k in served if e == 0)
    assert epoch0 == sorted(USABLE), "every usable video exactly once in epoch 0"
    assert all(e == 1 for e, _ in served if e != 0)  # a bucket's last step borrows from epoch 1 only
    assert sorted(g for g, r in skipped if g < N) == sorted(g for g, r in skipped if g < N and r == "too_short")
    assert len([g for g, _ in skipped if g < N]) == len(SHORT), "every short video reported once"
    assert sum(ld.stats["skipped/too_short"] for ld in loaders) == len(skipped)
    assert sum(ld.stats["samples"] for ld in loaders) == len(served)


@pytest.mark.parametrize("W1,W2,workers", [(2, 3, 0), (3, 1, 2)])
def test_resume_on_another_world_size_continues_every_bucket_exactly(root, W1, W2, workers):
    cfg = make_cfg(root, epochs=2)
    ref, _ = run(cfg, 1)
    first, loaders = run(cfg, W1, steps=3)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states), "the state is global: every rank saves the same"
    after, _ = run(make_cfg(root, epochs=2, num_workers=workers), W2, states=states[0])

    def per_bucket(per_rank):  # each bucket's samples, step by step
        out: dict = {}
        for t in range(max(len(s) for s in per_rank)):
            for e, k in sorted(x for s in per_rank for x in s[t][1]):
                out.setdefault(shape_of(k), []).append((e, k))
        return out
    ref_b, before_b, after_b = per_bucket(ref), per_bucket(first), per_bucket(after)
    for shape, seq in ref_b.items():  # the order within a bucket stream: the metadata test below
        got = before_b.get(shape, []) + after_b.get(shape, [])
        m = min(len(got), len(seq))
        assert {x for x in got if x[0] < 2} == {x for x in seq if x[0] < 2}, "epochs 0-1 served alike"
        assert set(got[:m - 3 * 3]) <= set(seq[:m]), "a bucket continues where it stopped"
    total = [x for b in (before_b, after_b) for seq in b.values() for x in seq]
    assert len(total) == len(set(total)), "nothing served twice"
    assert sorted(video_of(k) for e, k in total if e < 2) == sorted(list(USABLE) * 2)


def test_short_videos_are_skipped_without_opening_their_shards(tmp_path, monkeypatch):
    """Acceptance 4: shards holding only videos too short for the stage are never fetched."""
    import data.shards

    lengths = [9] * 4 + [3] * 4 + [9] * 4 + [3] * 4  # shards 1 and 3 hold only 3-frame videos
    write_toy_dataset(str(tmp_path), [4, 4, 4, 4], frames=lengths)
    loads = []
    real = data.shards.load_shard
    monkeypatch.setattr(data.shards, "load_shard", lambda fs, root, meta, shard, *a, **k: (
        loads.append(meta.names[shard]), real(fs, root, meta, shard, *a, **k))[1])
    skipped = served = 0
    for r in range(2):
        loader = LatentLoader(make_cfg(str(tmp_path), batch_size=2, num_streams=4), r, 2)
        for b in loader:
            served += sum(len(row) for row in b.clips)
            skipped += len(b.skipped)
        assert loader.stats["skipped/too_short"] + loader.stats["samples"] > 0
    assert sorted(set(loads)) == ["train-000000", "train-000002"], loads
    assert served == 8 and skipped == 8


def test_per_shape_batch_size_and_token_budget(root):
    cfg = make_cfg(root, bucket_batch_size={"4x6": 3}, batch_tokens=0)
    loader = LatentLoader(cfg)
    assert dict(zip(loader.buckets.names, loader.buckets.batch)) == {"4x4": 2, "4x6": 3, "6x4": 2}
    for b in loader:  # a full step of bucket 4x6 holds 3 samples (one rank)
        if b.clips:
            assert len(b.clips) <= (3 if tuple(b.latents.shape[-2:]) == (4, 6) else 2)
    # token budget: a 4-frame sample of a 4x6 latent takes at most 7 * (6 + 2) = 56 tokens
    sized = LatentLoader(make_cfg(root, batch_tokens=120))
    assert dict(zip(sized.buckets.names, sized.buckets.batch)) == {"4x4": 120 // 42, "4x6": 120 // 56,
                                                                     "6x4": 120 // 56}
    with pytest.raises(ConfigError, match=r"bucket_batch_size: \['9x9'\] name no shape bucket.*'4x4'"):
        LatentLoader(make_cfg(root, bucket_batch_size={"9x9": 2}))
    from jobconfig.loader import load_config
    with pytest.raises(ConfigError, match=r"data.bucket_batch_size: got '22-40': 4, expected a latent shape 'HxW'"):
        load_config(None, ['--data.bucket_batch_size={"22-40": 4}'])


def test_mixed_shapes_without_recorded_shapes_fail_clearly(tmp_path):
    write_toy_dataset(str(tmp_path), [4], frames=8, shape=[(1, 4, 4), (1, 4, 6)] * 2, record_shapes=False)
    with pytest.raises(ConfigError, match="records no per-sample shapes"):
        list(LatentLoader(make_cfg(str(tmp_path), batch_size=4)))


REACHED: list[str] = []  # the examples that went through every assertion, by tail rule


@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), skips=st.integers(0, 10),
       B=st.lists(st.integers(1, 3), min_size=4, max_size=4), W1=st.integers(1, 3), W2=st.integers(1, 3),
       k=st.integers(0, 8), n=st.integers(0, 2), tail=st.sampled_from(["roll", "drop"]))
@settings(max_examples=80, deadline=None, database=None)
def _bucket_schedule_property(sizes, skips, B, W1, W2, k, n, tail):
    batch = tuple(B[:len(sizes)])
    E = 2
    if tail == "drop":  # 'drop' refuses a schedule no bucket of which fills a global batch (test_loader_order
        # tests that refusal); bucket 0 fills one on both world sizes, so every draw is a schedule to test
        sizes = [max(sizes[0], max(W1, W2) * batch[0]), *sizes[1:]]
    first = Schedule(tuple(sizes), skips, batch, W1, (0,) * len(sizes), tail, E)
    k = min(k, first.num_steps())
    cur, reported_before = cursors_after(first, k)
    second = Schedule(tuple(sizes), skips, batch, W2, cur, tail, E, reported_before)
    got: dict[int, list[int]] = {}
    reported: list[int] = []
    for sched, steps in ((first, k), (second, second.num_steps())):
        for win in sched.windows():
            for t in range(len(win)):
                if win.first_step + t >= steps:
                    break
                reported += list(range(win.skips_lo[t], win.skips_hi[t]))
                b = int(win.bucket[t])
                cnt = 0
                for r in range(sched.world_size):
                    for w in range(max(1, n)):
                        st_, bk, it, _ = reader_items(win, sched.batch, sched.world_size, r, w, n)
                        cnt += int(((st_ == win.first_step + t)).sum())
                assert cnt == sched.global_batch[b]
                got.setdefault(b, []).extend(range(int(win.start[t]), int(win.start[t]) + sched.global_batch[b]))
    for b, nb in enumerate(sizes):
        seq = got.get(b, [])
        if tail == "roll":
            assert seq == list(range(len(seq))), "a bucket's stream is served in order, nothing twice or lost"
            assert len(seq) >= E * nb
        else:  # in order, nothing twice; an epoch's tail shorter than the (new) global batch is dropped
            assert seq == sorted(set(seq))
    if tail == "roll" or all(nb >= g for nb, g in zip(sizes, second.global_batch)):
        assert sorted(reported) == list(range(len(reported))) and len(reported) >= E * skips * (tail == "roll")
    assert progress(5, 10) == (1 << 31)  # halfway through epoch 0
    event(f"tail={tail}")
    REACHED.append(tail)


def test_bucket_schedule_serves_each_item_once_and_resumes_on_any_world_size():
    """Metadata only: every bucket's items of epochs 0-1 once, every known skip once, before and after a
    resume on another world size; each bucket's items come in stream order. Nearly every example must
    get through the assertions, of both tail rules."""
    REACHED.clear()
    _bucket_schedule_property()
    assert len(REACHED) >= 75 and min(REACHED.count("roll"), REACHED.count("drop")) >= 15, \
        (len(REACHED), REACHED.count("drop"))


def test_exact_resume_of_a_bucketed_run_with_workers(root):
    cfg = make_cfg(root, epochs=2, num_workers=2, pack_tokens=60)  # packing: rows of one bucket's samples
    full, _ = run(cfg, 2)
    head, loaders = run(cfg, 2, steps=4)
    tail, _ = run(cfg, 2, states=loaders[0].state_dict())
    assert [h + t for h, t in zip(head, tail)] == full
    packed = [b for b in LatentLoader(cfg) if b.clips]
    assert any(len(row) > 1 for b in packed for row in b.clips), "some rows hold several samples of one shape"


def test_a_recorded_shape_that_differs_from_the_data_is_an_undecodable_sample(tmp_path):
    import json

    from data.dataset_index import dataset_info, read_index, write_index
    from data.shard_format import ShardFormatError, committed_manifests, get_fs

    write_toy_dataset(str(tmp_path), [3, 3], frames=8, shape=(1, 4, 4))
    manifest = tmp_path / "shards" / "train-000001.json"
    recorded = json.loads(manifest.read_text())
    recorded["sample_shapes"][0] = [8, 1, 4, 6]  # v000003 is stored as 4x4
    manifest.write_text(json.dumps(recorded))
    fs, root = get_fs(str(tmp_path))  # the index, republished from the manifests, records it too
    write_index(fs, root, committed_manifests(fs, root), **dataset_info(read_index(fs, root)))
    with pytest.raises(ShardFormatError, match=r"train-000001 sample v000003: latents of shape \[8, 1, 4, 4\], "
                                               r"index.json records \[8, 1, 4, 6\]"):
        list(LatentLoader(make_cfg(str(tmp_path), corrupt_shards="fail")))
    loader = LatentLoader(make_cfg(str(tmp_path), corrupt_shards="skip"))
    batches = list(loader)
    assert "v000003" not in [key for b in batches for _, key, *_ in b.samples()]
    assert [r for b in batches for g, _, r in b.skipped if g < 6] == ["corrupt_sample"]  # once in epoch 0


def test_shapes_whose_every_sample_exceeds_max_tokens_are_skipped_unread(root, monkeypatch):
    import data.shards

    # 4 frames, random clips: a 4x6 or 6x4 latent (6 patches) takes at least 5 * 8 = 40 tokens, 4x4 at least 30
    cfg = make_cfg(root, stage=StageSamplingConfig(frames=4, interval="random", interval_min=1, interval_max=2,
                                                   clips="random", patch_size=2, max_tokens=35))
    reads = []
    real = data.shards.load_shard
    monkeypatch.setattr(data.shards, "load_shard", lambda fs, r, meta, shard, keep=None, *a, **k: (
        reads.append(set(keep)), real(fs, r, meta, shard, keep, *a, **k))[1])
    loader = LatentLoader(cfg)
    assert loader.buckets.names == ("4x4",)
    steps = list(loader)
    big = [v for v in USABLE if SHAPES[v][1:] != (4, 4)]
    assert loader.stats["skipped/too_many_tokens"] >= len(big)
    assert all(shape_of(k) == (4, 4) for b in steps for _, k, *_ in b.samples())
    read_videos = sum(len(k) for k in reads)
    assert read_videos <= N - len(big) - len(SHORT) + 2 * 2  # plus the few borrowed from epoch 1


@pytest.mark.parametrize("buckets", [1, 3])
def test_bucket_streams_keep_readers_on_their_own_shards(buckets):
    """48 shards, 12 streams, n*W | 12: the shards read in epoch 0, summed over readers, stay near one
    read per shard whatever the number of readers: piece boundaries cost a few shards per stream and bucket."""
    import numpy as np

    from data.buckets import Buckets
    from data.order import bucket_streams, epoch_order

    rng = np.random.default_rng(3)
    sizes, S = tuple([20] * 48), 12
    code = rng.integers(0, buckets, sum(sizes)).astype(np.int32)
    code[rng.random(sum(sizes)) < 0.1] = -1
    bk = Buckets(code, tuple(f"b{i}" for i in range(buckets)), (2,) * buckets)
    sh = epoch_order(sizes, 0, 0, S, 8)[0]
    streams = bucket_streams(sizes, bk.code, len(bk.names), 0, 0, S, 8)
    totals = set()
    for W, n in [(2, 1), (3, 2), (6, 2)]:
        sched = Schedule(bk.sizes, bk.num_known_skips, bk.batch, W, (0,) * buckets, "roll", 1)
        reads = 0
        for r in range(W):
            for w in range(n):
                shards = set()
                for win in sched.windows():
                    _, b, i, _ = reader_items(win, sched.batch, W, r, w, n)
                    for bb, ii in zip(b.tolist(), i.tolist()):
                        if ii < bk.sizes[bb]:  # epoch 0
                            shards.add(int(sh[streams[bb][ii]]))
                reads += len(shards)
        totals.add(reads)
    assert max(totals) <= len(sizes) + 2 * S * (buckets - 1) + S  # vs up to 12 readers x 48 shards unaligned
