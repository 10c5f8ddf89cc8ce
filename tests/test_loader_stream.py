"""The streaming loader on real shards (local files): acceptance 1-3, packing, skips.

Ranks are simulated by building the loader with (rank, world_size) in one
process; worker cases use real DataLoader worker processes. The toy dataset has
uneven shards and a few videos too short for the stage; every video's latents
encode (video, frame), so the tests check content, not only bookkeeping.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from data.batch import sequence_length
from data.batching import LatentBatch
from data.loader import LatentLoader
from data.synthetic.shards import video_of, write_toy_dataset
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig
from jobconfig.train import ObjectiveConfig

SIZES = [5, 1, 8, 3, 6, 2, 4]  # uneven shards, 29 videos
N = sum(SIZES)
SHORT = {4, 17}  # videos with 3 frames: too short for 4 frames at interval >= 1
LENGTHS = [3 if v in SHORT else 6 + (v * 7) % 20 for v in range(N)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # an index without recorded frame counts: every skip is found at read time and takes its slot
    # (recorded indexes, shape buckets and early skips: tests/test_loader_buckets.py)
    path = str(tmp_path_factory.mktemp("latents"))
    write_toy_dataset(path, SIZES, frames=LENGTHS, record_shapes=False)
    return path


def make_cfg(root, **kw) -> DataConfig:
    stage = StageSamplingConfig(frames=4, interval="random", interval_min=1, interval_max=3, clips="random",
                                patch_size=2)
    base = dict(root=root, seed=11, shuffle_buffer=4, batch_size=2, epochs=1, stage=stage)
    return DataConfig(**{**base, **kw})


def check_content(batch: LatentBatch) -> None:
    """Every frame of every sample is the stored frame of its own video (encoded as v*1000 + t)."""
    for r, row in enumerate(batch.clips):
        f0 = 0
        for s, clips in enumerate(row):
            want = torch.tensor([video_of(batch.keys[r][s]) * 1000 + t for t in batch.frame_indices[r][s]],
                                dtype=torch.float32)
            got = batch.latents[r, f0:f0 + sum(clips), 0, 0, 0]
            assert torch.equal(got, want), (batch.keys[r][s], got, want)
            f0 += sum(clips)
        assert not batch.latents[r, f0:].any(), "padding frames must be zero"


def drain(loader, steps=None):
    """(samples, skips) per step: samples as (global index, key, frames, clips, interval)."""
    out = []
    for batch in itertools.islice(loader, steps):
        check_content(batch)
        out.append((batch.samples(), [(g, reason) for g, _, reason in batch.skipped]))
    return out


def global_sequence(per_rank_steps: list[list]) -> list:
    """Merge ranks' steps into the global stream, in global-index order, with skips as (g, reason)."""
    items = []
    for steps in per_rank_steps:
        for samples, skips in steps:
            items += [(s[0], s) for s in samples] + [(g, ("skip", g, reason)) for g, reason in skips]
    items.sort(key=lambda x: x[0])
    return [x[1] for x in items]


@pytest.mark.parametrize("W,workers", list(itertools.product([1, 2, 3], [0, 1, 2])))
def test_one_epoch_serves_every_sample_exactly_once(root, W, workers):
    cfg = make_cfg(root, num_workers=workers)
    per_rank = [drain(LatentLoader(cfg, r, W)) for r in range(W)]
    steps = {len(s) for s in per_rank}
    G = W * cfg.batch_size
    assert steps == {-(-N // G)}, "every rank takes the same number of steps: ceil(N / G)"
    seq = global_sequence(per_rank)
    gidx = [x[1] if x[0] == "skip" else x[0] for x in seq]
    assert gidx == list(range(-(-N // G) * G)), "global positions 0.. served once, no gap"
    epoch0 = [x for x, g in zip(seq, gidx) if g < N]
    keys = sorted(x[1] for x in epoch0 if x[0] != "skip")
    skipped = [x for x in epoch0 if x[0] == "skip"]
    assert len(keys) == len(set(keys)) == N - len(SHORT)
    assert {video_of(k) for k in keys} == set(range(N)) - SHORT
    assert sorted(r for _, _, r in skipped) == ["too_short"] * len(SHORT)
    # roll rule: the last step is completed with the first positions of epoch 1, not padded or dropped
    assert all(g >= N for g in gidx[N:])


def test_drop_tail_rule(root):
    cfg = make_cfg(root, epoch_tail="drop", epochs=2, batch_size=2)
    W, G = 2, 4
    per_rank = [drain(LatentLoader(cfg, r, W)) for r in range(W)]
    assert [len(s) for s in per_rank] == [2 * (N // G)] * W
    gidx = sorted(x[1] if x[0] == "skip" else x[0] for x in global_sequence(per_rank))
    per_epoch = N // G * G
    assert gidx == list(range(per_epoch)) + list(range(N, N + per_epoch)), "tail of each epoch dropped"


@pytest.mark.parametrize("W,workers,k", [(1, 0, 5), (1, 2, 3), (2, 1, 4)])
def test_exact_resume_matches_an_uninterrupted_run(root, W, workers, k):
    cfg = make_cfg(root, num_workers=workers, epochs=3)  # crosses epoch boundaries
    for r in range(W):
        full = drain(LatentLoader(cfg, r, W))
        first = LatentLoader(cfg, r, W)
        head = drain(first, k)
        state = copy.deepcopy(first.state_dict())
        fresh = LatentLoader(cfg, r, W)
        fresh.load_state_dict(state)
        left = fresh.num_steps()
        tail = drain(fresh)
        assert head + tail == full  # keys, frame indices, clip partitions, intervals, skips
        assert len(head) == k and len(tail) == left > 0


@pytest.mark.parametrize("W2,workers", [(3, 0), (1, 2), (3, 2)])
def test_resume_on_another_world_size_continues_the_global_stream(root, W2, workers):
    cfg = make_cfg(root, epochs=2)
    W1, k = 2, 3
    reference = global_sequence([drain(LatentLoader(cfg, r, 1)) for r in range(1)])  # uninterrupted, 1 rank
    loaders = [LatentLoader(cfg, r, W1) for r in range(W1)]
    before = global_sequence([drain(ld, k) for ld in loaders])
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states), "the state is global: every rank saves the same"
    cfg2 = make_cfg(root, epochs=2, num_workers=workers)
    resumed = []
    for r in range(W2):
        ld = LatentLoader(cfg2, r, W2)
        ld.load_state_dict(states[0])
        resumed.append(drain(ld))
    after = global_sequence(resumed)
    assert len(before) == k * W1 * 2
    assert before + after[: len(reference) - len(before)] == reference  # nothing repeated, nothing skipped
    assert len({len(s) for s in resumed}) == 1, "resumed ranks agree on the number of steps"


def test_state_from_another_order_is_refused(root):
    state = LatentLoader(make_cfg(root)).state_dict()
    other = LatentLoader(make_cfg(root, seed=12))
    with pytest.raises(ConfigError, match=r"loader state: seed is 11 in the checkpoint but 12 now"):
        other.load_state_dict(state)
    state_bad = {**state, "dataset": "0000"}
    with pytest.raises(ConfigError, match="dataset"):
        LatentLoader(make_cfg(root)).load_state_dict(state_bad)


def test_packing_fills_a_token_budget_without_changing_the_samples(root):
    budget = 84  # 4x4 latents with patch 2: 4 + 2 tokens per frame copy; a 4-frame sample is 24..42 tokens
    plain = drain(LatentLoader(make_cfg(root, batch_size=4)))
    loader = LatentLoader(make_cfg(root, batch_size=4, pack_tokens=budget))
    packed, rows_seen = [], 0
    for batch in loader:
        check_content(batch)
        for row in batch.clips:
            assert sequence_length(row, 4) <= budget or len(row) == 1
        rows_seen += len(batch.clips)
        packed.append((batch.samples(), [(g, r) for g, _, r in batch.skipped]))
    assert packed == plain
    assert rows_seen < sum(len(s) for s, _ in plain), "some rows hold more than one sample"


def test_packed_batch_trains_through_the_objective(root):
    from pretrain.model.videogpt import build_model
    from pretrain.training.objective import next_clip_loss, row_seed

    model = build_model(ModelConfig(max_tokens=4096))
    loader = LatentLoader(make_cfg(root, batch_size=4, pack_tokens=84))
    batch = next(b for b in loader if any(len(row) > 1 for row in b.clips))
    loss = next_clip_loss(model, batch, ObjectiveConfig(), [row_seed(0, g) for g in batch.row_index])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0


def test_steps_whose_videos_are_all_too_short_still_count(tmp_path):
    write_toy_dataset(str(tmp_path), [3, 2], frames=[2, 9, 2, 2, 2], record_shapes=False)  # only v000001 fits
    served, empty = [], 0
    for r in range(2):
        loader = LatentLoader(make_cfg(str(tmp_path), batch_size=1), r, 2)
        batches = list(loader)
        assert len(batches) == 3  # ceil(5 / 2) on both ranks, even when a rank's batch is empty
        for b in batches:
            assert b.latents.shape[0] == len(b.clips)
            empty += not b.clips
            served += [(g, key) for g, key, *_ in b.samples()]
        assert loader.stats["steps"] == 3
        assert loader.stats["skipped/too_short"] + loader.stats["samples"] == 3
    assert [key for g, key in served if g < 5] == ["v000001"]
    assert empty >= 4


def test_more_workers_than_batch_and_drop_resume_at_an_epoch_end(root):
    """batch 1 with 2 workers (some worker chunks are empty); a 'drop' cursor may sit at the epoch's end."""
    cfg = make_cfg(root, batch_size=1, num_workers=2, epoch_tail="drop", epochs=2)
    full = drain(LatentLoader(cfg, 0, 1))
    first = LatentLoader(cfg, 0, 1)
    head = drain(first, N)  # exactly one epoch: the cursor (items of the one bucket consumed) is N
    assert first.state_dict()["cursors"] == {"4x4": N}
    fresh = LatentLoader(cfg, 0, 1)
    fresh.load_state_dict(first.state_dict())
    assert head + drain(fresh) == full and len(full) == 2 * N


@pytest.mark.parametrize("W", [2, 3])
def test_each_rank_reads_only_its_own_shards(tmp_path, monkeypatch, W):
    """12 equal shards, 12 streams: every shard is fetched by exactly one rank (no read amplification)."""
    import data.shards

    write_toy_dataset(str(tmp_path), [3] * 12, frames=8)
    loads = []
    real = data.shards.load_shard
    monkeypatch.setattr(data.shards, "load_shard", lambda fs, root, meta, shard, *a, **k: (
        loads.append((rank, meta.names[shard])), real(fs, root, meta, shard, *a, **k))[1])
    for rank in range(W):
        loader = LatentLoader(make_cfg(str(tmp_path)), rank, W)  # 36 samples, G = 2W divides 36
        assert loader.num_streams == 12
        drain(loader)
    names = [name for _, name in loads]
    assert sorted(names) == sorted(set(names)) and len(names) == 12


def test_serial_copy_converts_exactly_like_torch():
    from data.batching import copy_serial

    for src_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for dst_dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(6, 3, 4, 4) * 100).to(src_dtype)[::2]  # strided, like a frame-interval view
            out = torch.empty(3, 3, 4, 4, dtype=dst_dtype)
            copy_serial(out, x)
            assert torch.equal(out, x.to(dst_dtype)), (src_dtype, dst_dtype)


def test_a_state_from_before_shape_buckets_resumes_a_dataset_of_one_shape(root):
    cfg = make_cfg(root, epochs=2)
    first = LatentLoader(cfg)
    drain(first, 9)
    state = first.state_dict()
    (c,) = state["cursors"].values()
    old = {k: v for k, v in state.items() if k not in ("cursors", "skips", "buckets")}
    old.update(version=1, epoch=c // N, offset=c % N)  # what the loader saved before buckets
    a, b = LatentLoader(cfg), LatentLoader(cfg)
    a.load_state_dict(state)
    b.load_state_dict(old)
    assert drain(a) == drain(b)


@pytest.mark.parametrize("kind", ["latents", "synthetic"])
def test_data_sources_are_cursors_that_resume_exactly(tmp_path, kind):
    """The trainer's sources (data/sources.py) hand out the next micro batch from their own cursor;
    a source restored from another's state continues where that one stopped, on any world size, and
    LatentSource takes its placeholder shape from the loader's dataset (index.json read once)."""
    from data.sources import LatentSource, make_source
    from jobconfig.loader import load_config

    write_toy_dataset(str(tmp_path), [3, 2], frames=8, shape=(2, 4, 6))
    cfg = load_config(None, [f"--train.data={kind}", f"--data.root={tmp_path}", "--data.stage.frames=2",
                             "--data.stage.interval_value=1", "--data.batch_size=2", "--train.batch_size=2",
                             "--model.latent_channels=2", "--synthetic.latent_height=4",
                             "--synthetic.latent_width=6", "--train.grad_accum_steps=2"])

    def rows(src, n):
        return [tuple(src.next_batch()[1]) for _ in range(n)]

    one = make_source(cfg, 0, 1)
    ref = rows(one, 6)
    assert len(set(ref)) == 6, "each micro batch is new rows"
    head = make_source(cfg, 0, 1)
    rows(head, 2)
    tail = make_source(cfg, 0, 1)
    tail.load_state_dict(head.state_dict())
    assert rows(tail, 4) == ref[2:]
    two = [make_source(cfg, r, 2) for r in range(2)]
    for src in two:
        src.load_state_dict(head.state_dict())
    assert sorted(g for src in two for g in rows(src, 1)[0]) == sorted(ref[2] + ref[3])
    if kind == "latents":
        assert isinstance(one, LatentSource) and tuple(one.placeholder().latents.shape[2:]) == (2, 4, 6)
