"""Long videos as segments (data/video.py): a video of 3.5 x max_frames sampled frames becomes 4
samples (more with overlap) whose frames, put back together, are exactly the frames of one
unsegmented decode; later segments seek instead of decoding from the start, and so does a stride
that spans keyframes; the decode-from-the-start fallback gives the same frames; the latents of the
segments are the unsegmented encode's, frame for frame. Real h264 files written with PyAV."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data.precompute_plan import make_key, segment_key, source_key
from data.synthetic.videos import pattern_frames, write_video
from data.video import decode_segment, decode_video, iter_segments, segment_bounds
from jobconfig.errors import ConfigError
from jobconfig.precompute import PrecomputeConfig, VideoConfig

MAX, GOP = 8, 4


def write_h264(path, frames: np.ndarray, fps: int, gop: int):
    """h264 with B-frames and a keyframe every `gop` frames (what makes seeking worth it)."""
    return write_video(path, frames, fps, codec="h264",
                       options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "2"})


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return str(write_h264(tmp_path_factory.mktemp("seg") / "long clip.mp4",
                          pattern_frames(192, 128, int(3.5 * MAX), seed=5), fps=24, gop=GOP))


def test_bounds_cover_every_frame_and_drop_only_a_too_short_tail():
    cfg = VideoConfig(max_frames=8, min_frames=3)
    assert segment_bounds(28, cfg) == [(0, 8), (8, 16), (16, 24), (24, 28)]
    assert segment_bounds(8, cfg) == [(0, 8)] and segment_bounds(28, VideoConfig(min_frames=3)) == [(0, 28)]
    assert segment_bounds(26, cfg) == [(0, 8), (8, 16), (16, 24)]  # 2 left < min_frames: dropped
    lapped = dataclasses.replace(cfg, segment_overlap=2)
    assert segment_bounds(28, lapped) == [(0, 8), (6, 14), (12, 20), (18, 26), (24, 28)]
    assert segment_bounds(28, dataclasses.replace(cfg, long_videos="truncate")) == [(0, 8)]
    key = make_key("/v/long clip.mp4")
    assert segment_key(key, 3, 4) == f"{key}-s0003" and segment_key(key, 0, 1) == key
    assert source_key(segment_key(key, 3, 4)) == key == source_key(key)


def test_segments_concatenate_to_the_unsegmented_decode_and_seek(long_clip):
    whole = decode_video(long_clip, VideoConfig(min_frames=4))
    assert whole.frames.shape[0] == 28 and whole.num_segments == 1 and not whole.meta["truncated"]
    segs = list(iter_segments(long_clip, VideoConfig(max_frames=MAX, min_frames=4)))
    assert [s.frames.shape[0] for s in segs] == [8, 8, 8, 4] and [s.first_frame for s in segs] == [0, 8, 16, 24]
    assert np.array_equal(np.concatenate([s.frames for s in segs]), whole.frames)
    assert [s.meta["segment"] for s in segs] == [0, 1, 2, 3] and {s.meta["num_segments"] for s in segs} == {4}
    assert segs[3].frame_indices == list(range(24, 28))
    # Segments after the first seek to the keyframe before their first frame: each decodes its own
    # frames plus at most the GOP lead-in and B-frame reordering, not the 16..24 frames before it.
    assert all(s.frames_decoded <= MAX + GOP for s in segs[1:]), [s.frames_decoded for s in segs]

    lapped = list(iter_segments(long_clip, VideoConfig(max_frames=MAX, min_frames=4, segment_overlap=2)))
    assert [(s.first_frame, s.frames.shape[0]) for s in lapped] == [(0, 8), (6, 8), (12, 8), (18, 8), (24, 4)]
    for s in lapped:
        assert np.array_equal(s.frames, whole.frames[s.first_frame:s.first_frame + s.frames.shape[0]])

    # A stride across keyframes seeks past the skipped GOPs instead of decoding them.
    strided = decode_video(long_clip, VideoConfig(min_frames=2, stride=8))
    assert strided.frame_indices == [0, 8, 16, 24] and np.array_equal(strided.frames, whole.frames[::8])
    assert strided.frames_decoded < 28 // 2, strided.frames_decoded


def test_decoding_from_the_start_gives_the_same_segments(long_clip):
    """Streams whose packets cannot be trusted are decoded from the start: same frames, no seeking."""
    cfg = VideoConfig(max_frames=MAX, min_frames=4)
    first = decode_segment(long_clip, cfg)
    blind = dataclasses.replace(first.table, pts=None, key_before=None)
    for i in range(first.num_segments):
        seek = decode_segment(long_clip, cfg, segment=i, table=first.table)
        scan = decode_segment(long_clip, cfg, segment=i, table=blind)
        assert np.array_equal(seek.frames, scan.frames) and seek.frame_indices == scan.frame_indices
        assert scan.frames_decoded == 28 and scan.meta == seek.meta


def test_a_remote_input_is_read_from_its_store_once(long_clip, monkeypatch):
    """A decode that probes, seeks and then falls back to decoding from the start makes three passes
    over the input; a remote one is still fetched once (data/video.py, `_fetched`)."""
    from pathlib import Path

    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/clips/long.mp4", Path(long_clip).read_bytes())
    opened = []
    real_open = type(fs)._open
    monkeypatch.setattr(type(fs), "_open", lambda self, path, *a, **k: (opened.append(path), real_open(
        self, path, *a, **k))[1])
    cfg = VideoConfig(max_frames=MAX, min_frames=4)
    local = decode_segment(long_clip, cfg, segment=1)
    blind = dataclasses.replace(local.table, pts=None, key_before=None)
    remote = decode_segment("memory://clips/long.mp4", cfg, segment=1, table=blind)  # decodes from the start
    assert np.array_equal(remote.frames, local.frames) and remote.frames_decoded == 28
    assert len(opened) == 1, opened
    opened.clear()
    probed = decode_segment("memory://clips/long.mp4", cfg, segment=2)  # probe, then seek: one read
    assert len(opened) == 1 and probed.frame_indices == local.table.kept[16:24]
    fs.rm("/clips/long.mp4")


def test_segment_settings_validated_and_hashed_only_when_they_matter():
    with pytest.raises(ConfigError, match="segment_overlap: got 8"):
        VideoConfig(max_frames=8, min_frames=4, segment_overlap=8).validate()
    plain = PrecomputeConfig().dataset_dict()["video"]
    assert "long_videos" not in plain and "segment_overlap" not in plain  # hashes of older datasets unchanged
    capped = PrecomputeConfig(video=VideoConfig(max_frames=64, segment_overlap=4)).dataset_dict()["video"]
    assert capped["long_videos"] == "segment" and capped["segment_overlap"] == 4
