"""Video-level sampling (issue 29, acceptance 3): a long video stored as segments is one sample.

The toy dataset holds long videos cut into overlapping segments (16 frames, 4 shared, as the
precompute job cuts them with max_frames=16, segment_overlap=4) and short ones. The stage's
window spans 19 frames, longer than any segment: every window of a segmented video crosses a
segment edge, and every segment alone would be too short. Every video's latents encode
(video, frame) (data/synthetic/shards.py), so `check_content` proves from the tensors alone that
a window holds its video's frames, whatever segments it was cut from.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from data.buckets import SKIP_HELDOUT, build_buckets, plan_or_skip
from data.blend import Blend
from data.dataset_index import open_dataset, write_index
from data.heldout_split import heldout_mask, key_hash
from data.loader import LatentLoader
from data.order import epoch_order, resolve_num_streams
from data.shard_format import ShardFormatError, committed_manifests, get_fs
from data.synthetic.shards import toy_segments, video_of, write_toy_dataset
from data.videos import Videos
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from orchestration.preflight import check_dataset
from tests.test_loader_stream import check_content, drain, global_sequence

SIZES = [3, 2, 3]                               # videos per shard
LENGTHS = [8, 70, 20, 3, 25, 30, 12, 19]        # v1: 6 segments; v2, v4, v7: 2; v5: 3
SEGMENTS = (16, 4)                              # max_frames, overlap
V = len(LENGTHS)
STAGE = StageSamplingConfig(frames=4, interval="fixed", interval_value=6, clips="random", patch_size=2)
SPAN = (STAGE.frames - 1) * STAGE.interval_value + 1   # 19 frames: more than a segment holds
USABLE = {v for v, t in enumerate(LENGTHS) if t >= SPAN}
SHORT = set(range(V)) - USABLE


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The same videos, stored segmented and whole."""
    seg, whole = str(tmp_path_factory.mktemp("segmented")), str(tmp_path_factory.mktemp("whole"))
    write_toy_dataset(seg, SIZES, frames=LENGTHS, segments=SEGMENTS)
    write_toy_dataset(whole, SIZES, frames=LENGTHS)
    return seg, whole


def make_cfg(root, **kw) -> DataConfig:
    return DataConfig(**{**dict(root=root, seed=7, shuffle_buffer=3, batch_size=2, epochs=1, stage=STAGE), **kw})


def test_the_index_groups_segments_into_videos(roots):
    seg, _ = roots
    meta, videos = open_dataset(seg), Videos.of(open_dataset(seg))
    counts = [len(toy_segments(t, SEGMENTS)) for t in LENGTHS]
    assert counts == [1, 6, 2, 1, 2, 3, 1, 2] and meta.num_samples == sum(counts)
    assert videos.num == V and videos.sizes == tuple(SIZES) and videos.frames.tolist() == LENGTHS
    assert [videos.samples(v)[1] - videos.samples(v)[0] for v in range(V)] == counts
    assert [videos.key(v, meta.key(videos.samples(v)[1] - 1)) for v in range(V)] == [f"v{v:06d}" for v in range(V)]
    # a window's pieces: the earliest segment holding each frame, strided within each segment
    assert videos.pieces(1, (10, 16, 22, 28), 6) == [(1, 10, 16), (2, 4, 16), (3, 4, 5)]
    assert videos.pieces(1, (51, 57, 63, 69), 6) == [(5, 3, 16), (6, 9, 10)]


@pytest.mark.parametrize("W,workers", [(1, 0), (2, 0), (3, 1)])
def test_one_epoch_serves_each_video_exactly_once(roots, W, workers):
    seg, _ = roots
    loaders = [LatentLoader(make_cfg(seg, num_workers=workers), r, W) for r in range(W)]
    per_rank = [drain(ld) for ld in loaders]
    assert len({len(s) for s in per_rank}) == 1, "every rank takes the same number of steps"
    seq = global_sequence(per_rank)
    epoch0 = [x for x in seq if (x[1] if x[0] == "skip" else x[0]) < V]
    served = [video_of(x[1]) for x in epoch0 if x[0] != "skip"]
    assert sorted(served) == sorted(USABLE), "each usable video once, however many segments it has"
    assert sorted(x[2] for x in epoch0 if x[0] == "skip") == ["too_short"] * len(SHORT)
    assert sum(ld.stats["skipped/too_short"] for ld in loaders) == len([x for x in seq if x[0] == "skip"])
    assert sum(ld.stats["samples"] for ld in loaders) == len([x for x in seq if x[0] != "skip"])


def start_of(videos: Videos, cfg: DataConfig, v: int, epoch: int) -> int:
    """The first frame of video v's window in `epoch`, from the order arithmetic alone (no shard read)."""
    shard = int(np.searchsorted(videos.offsets, v, side="right")) - 1
    S = resolve_num_streams(cfg.num_streams, len(videos.meta.names))
    sh, ix = epoch_order(videos.sizes, cfg.seed, epoch, S, cfg.shuffle_buffer)
    p = int(np.flatnonzero((sh == shard) & (ix == v - videos.offsets[shard]))[0])
    T, _, h, w = videos.shape(v)
    return plan_or_skip(cfg.stage, cfg.seed, epoch, p, T, (h, w)).frame_indices[0]


def test_window_starts_are_uniform_over_the_whole_video(roots):
    """Chi-square over 2650 epochs (fixed seed): the long video's window starts at each of its 53
    admissible frames with equal probability, crossing its segment edges as often as that implies."""
    seg, _ = roots
    cfg, videos = make_cfg(seg), Videos.of(open_dataset(seg))
    admissible = LENGTHS[1] - SPAN + 1
    starts = Counter(start_of(videos, cfg, 1, e) for e in range(50 * admissible))
    assert set(starts) == set(range(admissible)), "every admissible start, and only those"
    assert chisquare([starts[s] for s in range(admissible)]).pvalue > 1e-3
    # the segmented reading agrees: windows starting in the overlap-free part of the last segment read one
    # segment, every other reads two or three
    pieces = {s: len(videos.pieces(1, tuple(range(s, s + SPAN, 6)), 6)) for s in range(admissible)}
    assert set(pieces.values()) == {2, 3}


@pytest.mark.parametrize("form", [None, "posterior"])
def test_windows_across_segment_edges_equal_the_unsegmented_latents(tmp_path, form):
    seg, whole = str(tmp_path / "seg"), str(tmp_path / "whole")
    write_toy_dataset(seg, SIZES, frames=LENGTHS, segments=SEGMENTS, latent_form=form)
    write_toy_dataset(whole, SIZES, frames=LENGTHS, latent_form=form)
    got = {}
    for root in (seg, whole):
        got[root] = [(b.samples(), b.skipped, b.latents) for b in LatentLoader(make_cfg(root, epochs=3))]
    videos, crossed, starts = Videos.of(open_dataset(seg)), 0, []
    assert len(got[seg]) == len(got[whole])
    for (samples, skipped, x), (samples_w, skipped_w, x_w) in zip(got[seg], got[whole]):
        assert samples == samples_w and skipped == skipped_w
        assert torch.equal(x, x_w), "the same window, tensor for tensor, cut from segments or from the whole"
        for g, key, frames, _, d in samples:
            crossed += len(videos.pieces(video_of(key), frames, d)) > 1
            if video_of(key) == 1:
                starts.append((g // V, frames[0]))
    assert crossed == sum(len(s) for s, _, _ in got[seg]) > 0  # every window of 19 frames crosses an edge
    cfg = make_cfg(seg)
    assert starts and all(s == start_of(videos, cfg, 1, e) for e, s in starts), "the loader draws as the arithmetic"


@pytest.mark.parametrize("W1,W2,workers", [(1, 1, 0), (2, 3, 0), (3, 1, 1)])
def test_resume_exactly_on_any_number_of_ranks(roots, W1, W2, workers):
    seg, _ = roots
    cfg = make_cfg(seg, epochs=3)
    reference = global_sequence([drain(LatentLoader(cfg, 0, 1))])
    loaders = [LatentLoader(cfg, r, W1) for r in range(W1)]
    before = [drain(ld, 2) for ld in loaders]
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states) and json.loads(json.dumps(states[0])) == states[0]
    resumed = []
    for r in range(W2):
        ld = LatentLoader(make_cfg(seg, epochs=3, num_workers=workers), r, W2)
        ld.load_state_dict(states[0])
        resumed.append(drain(ld))
    # a step serves a bucket's stream, not global indices in order: compare the 3 epochs whole (a last step
    # completed from epoch 3 depends on the global batch)
    def epochs(seq):
        return [x for x in seq if (x[1] if x[0] == "skip" else x[0]) < 3 * V]
    assert epochs(global_sequence(before + resumed)) == epochs(reference)  # none repeated or lost, same windows
    assert len({len(s) for s in resumed}) == 1 and all(len(s) == 2 for s in before)


def test_heldout_split_keeps_every_segment_of_a_video_on_one_side(roots):
    seg, whole = roots
    meta, videos = open_dataset(seg), Videos.of(open_dataset(seg))
    for fraction in (0.3, 0.6):
        mask = heldout_mask(meta, fraction)
        sides = [set(mask[slice(*videos.samples(v))].tolist()) for v in range(V)]
        assert all(len(s) == 1 for s in sides), "a video's segments split together"
        held = {v for v in range(V) if sides[v] == {True}}
        assert held == {v for v in range(V) if (key_hash(f"v{v:06d}") >> 11) / 2 ** 53 < fraction}
        # the same videos as the unsegmented copy holds out, and the loader never serves them
        assert np.flatnonzero(heldout_mask(open_dataset(whole), fraction)).tolist() == sorted(held)
        cfg = make_cfg(seg, epochs=2)
        served, skipped = [], []
        for b in LatentLoader(cfg, 0, 1, heldout=fraction):
            served += [video_of(k) for row in b.keys for k in row]
            skipped += [reason for _, _, reason in b.skipped]
        assert held and held != set(range(V)) and sorted(served) == sorted(list(USABLE - held) * 2)
        assert Counter(skipped)[SKIP_HELDOUT] == 2 * len(held)


def test_a_blend_serves_a_segmented_source_as_that_source_alone(roots):
    seg, whole = roots
    blend = Blend([LatentLoader(make_cfg(seg, epochs=3)), LatentLoader(make_cfg(whole, seed=8, epochs=3))],
                  ["seg", "whole"], [2, 1])
    got: dict[int, list] = {0: [], 1: []}
    for i, b in blend:
        check_content(b)
        got[i].append(b.samples())
    for i, root in enumerate((seg, whole)):
        alone = [b.samples() for b in LatentLoader(make_cfg(root, seed=7 + i, epochs=3))]
        assert got[i] and got[i] == alone[:len(got[i])]
    assert [d["samples"] for d in blend.describe()] == [V, V], "a source's samples are its videos"


def _republish(root, edit):
    """Publish the index again from the committed manifests, each passed through `edit` first."""
    fs, path = get_fs(root)
    manifests = {name: edit(m) for name, m in committed_manifests(fs, path).items()}
    write_index(fs, path, manifests, latent_shape=[4, 4, 4], dtype="float32")


def test_an_index_without_first_frames_samples_each_segment_as_before(tmp_path):
    """An index of before the column: every stored sample is its own video (the order, keys and
    skips of before, so its checkpoints resume); a window then stays inside one segment."""
    root = str(tmp_path)
    write_toy_dataset(root, SIZES, frames=LENGTHS, segments=SEGMENTS)
    _republish(root, lambda m: m.__class__(**{**m.__dict__, "sample_first_frames": None}))
    meta = open_dataset(root)
    assert meta.first_frames is None and not Videos.of(meta).grouped
    stage = StageSamplingConfig(frames=4, interval="fixed", interval_value=2, clips="random", patch_size=2)
    keys = []
    for b in LatentLoader(make_cfg(root, stage=stage)):
        for _, key, frames, _, _ in b.samples():
            keys.append(key)
            assert frames[-1] < 16, "a window within one stored sample"
    assert sorted(keys) == sorted(meta.key(i) for i in range(meta.num_samples) if meta.frames[i] >= 7)


def test_segments_that_do_not_continue_their_video_are_refused_naming_the_key(tmp_path):
    root = str(tmp_path)
    write_toy_dataset(root, SIZES, frames=LENGTHS, segments=SEGMENTS)

    def gap(m):  # v000001's third segment starts 2 frames after the second ends
        ff = [f + 6 if k == "v000001-s0002" else f for k, f in zip(m.keys, m.sample_first_frames)]
        return m.__class__(**{**m.__dict__, "sample_first_frames": ff})
    _republish(root, gap)
    with pytest.raises(ShardFormatError, match=r"sample 'v000001-s0002' \(frames 30\.\.45.* does not continue "
                                               r"'v000001-s0001' \(frames 12\.\.27"):
        LatentLoader(make_cfg(root))
    job = load_config(None, [f"--data.root={root}", "--data.stage.frames=4", "--data.stage.interval_value=6"])
    with pytest.raises(ConfigError, match=r"stage2: .*sample 'v000001-s0002' .* does not continue"):
        check_dataset("stage2", job, open_dataset(root))  # the preflight says it before any process starts

    def split(m):  # a shard that starts mid-video
        ff = [5 if i == 0 and m.name == "train-000001" else f for i, f in enumerate(m.sample_first_frames)]
        return m.__class__(**{**m.__dict__, "sample_first_frames": ff})
    write_toy_dataset(root, SIZES, frames=LENGTHS, segments=SEGMENTS)
    _republish(root, split)
    with pytest.raises(ShardFormatError, match=r"shard train-000001 starts with sample 'v000003' of first frame 5"):
        LatentLoader(make_cfg(root))


def test_a_video_is_too_short_only_by_its_whole_length(roots):
    """Every segment holds 16 frames or fewer, less than the window's 19: the stage is still usable,
    and a stage longer than the longest video is refused naming that video's length."""
    seg, _ = roots
    meta = open_dataset(seg)
    assert max(meta.frames.tolist()) < SPAN
    buckets = build_buckets(meta, make_cfg(seg))
    assert buckets.sizes == (len(USABLE),) and buckets.num_known_skips == len(SHORT)
    long = StageSamplingConfig(frames=4, interval="fixed", interval_value=24, clips="random", patch_size=2)
    with pytest.raises(ConfigError, match="the longest video in .* has 70 frames"):
        build_buckets(meta, make_cfg(seg, stage=long))
