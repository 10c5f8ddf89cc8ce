"""Video -> model-ready frames: decode (PyAV), sample, resize, crop, normalise.

Any container/codec FFmpeg reads works; the file is opened through fsspec so
inputs can be local or on object storage (a remote input is read from the store
once per decode, however many passes the decode makes over it). Geometry follows METHOD.md (and the
reference's `crop_arr`): resize so the long side is at most `max_image_size`
(bicubic, aspect kept, sides rounded), then center-crop both sides down to
multiples of 16, putting the odd pixel at the end. Rejection rules (too few
frames, a side < min_side, aspect beyond max_aspect, unreadable input) raise
`VideoRejected` with a reason; the farm quarantines those inputs instead of
crashing. Frames stay uint8 until the encoder so that decoded videos cost 4x
less in the object store than float frames would.

Long videos: with `max_frames` set, a video with more sampled frames becomes
several segments of at most `max_frames` (consecutive ones sharing
`segment_overlap` frames), decoded one at a time so memory stays bounded
whatever the length (`segment_bounds`, `decode_segment`). Which frames exist
is learnt from the container's packets without decoding (`FrameTable`): each
segment then seeks to the keyframe before its first frame, and a stride that
spans a keyframe seeks past the frames it skips instead of decoding them.
Streams whose packets do not say where each frame is (no pts, duplicates, a
decoder that disagrees) fall back to decoding from the start and counting,
which gives the same frames, only slower.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, ContextManager, Iterator, Optional

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from fsspec.implementations.local import LocalFileSystem

from data.shard_format import get_fs
from jobconfig.precompute import VideoConfig

_SPOOL_BYTES = 256 << 20  # a remote input is held in memory up to this size, in a local temp file past it


class VideoRejected(Exception):
    """An input the farm skips; `reason` is what goes into errors/<key>.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Geometry:
    resized: tuple[int, int]  # (width, height) after resize
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in resized pixels

    @property
    def size(self) -> tuple[int, int]:
        left, top, right, bottom = self.crop
        return right - left, bottom - top


@dataclass
class FrameTable:
    """A source's frames in presentation order and which of them the sampler keeps. Built from the
    packets (no decoding) when they carry distinct timestamps; then `pts`/`key_before` say where
    each frame is and which keyframe to seek to for it. None there: decode from the start."""
    num_frames: int
    kept: list[int]  # decoded index (in presentation order) of each sampled frame
    fps: float  # rate of the sampled frames
    pts: Optional[list[int]] = None
    key_before: Optional[list[int]] = None  # per frame: index of the keyframe at or before it


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3], H and W multiples of 16
    fps: float  # rate of the stored frames
    frame_indices: list[int]  # index of each stored frame among the decoded source frames
    meta: dict = field(default_factory=dict)  # source facts for meta.json
    segment: int = 0
    num_segments: int = 1
    first_frame: int = 0  # index of frames[0] among the video's sampled frames
    table: Optional[FrameTable] = None  # hand it to the other segments' decodes: they skip the probe
    frames_decoded: int = 0  # frames the decoder produced for this call (seeking keeps it low)
    # (a table without pts, from a decode pass, tells them to decode from the start straight away)


def target_geometry(width: int, height: int, max_image_size: int) -> Geometry:
    """Resize (long side <= max_image_size, sides rounded) then crop to multiples of 16."""
    scale = min(1.0, max_image_size / max(width, height))
    rw, rh = (max(1, round(width * scale)), max(1, round(height * scale))) if scale < 1 else (width, height)
    cw, ch = rw - rw % 16, rh - rh % 16
    if cw < 16 or ch < 16:
        raise VideoRejected(f"too small after resize: {rw}x{rh} leaves no 16x16 crop")
    left, top = (rw % 16) // 2, (rh % 16) // 2
    return Geometry((rw, rh), (left, top, left + cw, top + ch))


def check_source(width: int, height: int, cfg: VideoConfig) -> None:
    if min(width, height) < cfg.min_side:
        raise VideoRejected(f"too small: {width}x{height}, a side is below min_side={cfg.min_side}")
    aspect = max(width, height) / min(width, height)
    if aspect > cfg.max_aspect:
        raise VideoRejected(f"aspect ratio {aspect:.2f}:1 of {width}x{height} is beyond max_aspect={cfg.max_aspect}")


def segment_bounds(num_sampled: int, cfg: VideoConfig) -> list[tuple[int, int]]:
    """[start, end) of each sample cut from `num_sampled` sampled frames. One segment when the video
    fits in max_frames (or max_frames is 0); `truncate` keeps only the first; `segment` steps by
    max_frames - segment_overlap and drops a last piece shorter than min_frames (too short to train on)."""
    cap = cfg.max_frames
    if not cap or num_sampled <= cap:
        return [(0, num_sampled)]
    if cfg.long_videos == "truncate":
        return [(0, cap)]
    step, out, start = cap - cfg.segment_overlap, [], 0
    while True:
        end = min(start + cap, num_sampled)
        out.append((start, end))
        start += step
        if end >= num_sampled or num_sampled - start < cfg.min_frames:
            return out


class _Sampler:
    """Which decoded frames to keep: by timestamp at sample_fps, or every stride-th."""

    def __init__(self, cfg: VideoConfig, source_fps: float):
        self.cfg, self.next_t, self.index = cfg, 0.0, 0
        self.step = 1.0 / cfg.sample_fps if cfg.sample_fps else None
        self.fps = cfg.sample_fps if cfg.sample_fps else source_fps / cfg.stride

    def keep(self, t: Optional[float]) -> bool:
        i, self.index = self.index, self.index + 1
        if self.step is None:
            return i % self.cfg.stride == 0
        if t is None:  # no timestamps: assume the nominal source rate
            t = i / (self.fps * 1.0)
        # Half a microsecond of slack: pts are rationals, targets are floats.
        if t + 5e-7 < self.next_t:
            return False
        while self.next_t <= t + 5e-7:
            self.next_t += self.step
        return True


def _source_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


class _Source:
    """An open input: container, video stream and the facts every segment needs."""

    def __init__(self, container, cfg: VideoConfig, threads: int):
        if not container.streams.video:
            raise VideoRejected("no video stream")
        self.container, self.stream = container, container.streams.video[0]
        # Frame and slice threads; thread_count 0 lets FFmpeg pick (one per core).
        self.stream.thread_type = "AUTO"
        self.stream.codec_context.thread_count = max(0, int(threads))
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height
        if not self.width or not self.height:
            raise VideoRejected(f"video stream has no frame size ({self.width}x{self.height})")
        check_source(self.width, self.height, cfg)
        self.fps = _source_fps(self.stream)
        if cfg.sample_fps is None and self.fps <= 0:
            raise VideoRejected("unknown frame rate and no sample_fps configured")
        self.geo = target_geometry(self.width, self.height, cfg.max_image_size)
        self.decoded = 0
        self.scaler = VideoReformatter()

    def time(self, pts) -> Optional[float]:
        return None if pts is None else float(pts * self.stream.time_base)

    def convert(self, frame) -> np.ndarray:
        left, top, right, bottom = self.geo.crop
        # One reformatter per input: it keeps its scaler (frame.reformat would build a new bicubic
        # SwsContext for every frame, measured ~1.5x slower at 1080p).
        rgb = self.scaler.reformat(frame, width=self.geo.resized[0], height=self.geo.resized[1], format="rgb24",
                                   interpolation="BICUBIC").to_ndarray()
        return np.ascontiguousarray(rgb[top:bottom, left:right])


@contextmanager
def _fetched(uri: str, storage_options: dict | None) -> Iterator[Callable[[], ContextManager[BinaryIO]]]:
    """An opener of the input that every pass of a decode (probe, seeks, decode from the start) uses,
    so a remote input is read from its store once: it is copied into a spooled temporary file (memory
    up to _SPOOL_BYTES, local disk past it) that each pass rewinds. A local file is opened as is."""
    fs, path = get_fs(uri, storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise VideoRejected("file not found") from None
    if not size:
        raise VideoRejected("empty file (0 bytes)")
    if isinstance(fs, LocalFileSystem):
        yield lambda: fs.open(path, "rb")
        return
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        with fs.open(path, "rb") as f:
            shutil.copyfileobj(f, spool, 8 << 20)

        @contextmanager
        def rewound() -> Iterator[BinaryIO]:
            spool.seek(0)
            yield spool

        yield rewound


@contextmanager
def _open(opener: Callable[[], ContextManager[BinaryIO]], cfg: VideoConfig, threads: int) -> Iterator[_Source]:
    with opener() as f:
        try:
            container = av.open(f, mode="r")
        except (av.error.FFmpegError, ValueError, EOFError) as e:
            raise VideoRejected(f"not a readable video container: {e}") from None
        with container:
            yield _Source(container, cfg, threads)


class _Mismatch(Exception):
    """The decoder's frames are not the ones the packet table promised: decode from the start instead."""


def _probe(src: _Source, cfg: VideoConfig) -> Optional[FrameTable]:
    """The frame table from the packets alone (demuxing reads the file but decodes nothing)."""
    pts, key = [], []
    try:
        for packet in src.container.demux(src.stream):
            if packet.size == 0 or getattr(packet, "is_discard", False):
                continue  # the demuxer's end-of-stream marker; edit-list drops the decoder skips
            if packet.pts is None:
                return None
            pts.append(int(packet.pts))
            key.append(bool(packet.is_keyframe))
    except (av.error.FFmpegError, EOFError):
        return None
    order = sorted(range(len(pts)), key=pts.__getitem__)  # decode order -> presentation order
    pts, key = [pts[i] for i in order], [key[i] for i in order]
    if not pts or len(set(pts)) != len(pts):
        return None
    key_before, last = [], 0
    for i, k in enumerate(key):
        last = i if k else last
        key_before.append(last)
    sampler = _Sampler(cfg, src.fps)
    kept = [i for i, p in enumerate(pts) if sampler.keep(src.time(p))]
    return FrameTable(len(pts), kept, float(sampler.fps), pts, key_before)


def _decode_seeking(src: _Source, table: FrameTable, wanted: list[int]) -> list[np.ndarray]:
    """The frames at decoded indices `wanted` (ascending): seek to a wanted frame's keyframe whenever
    that keyframe lies ahead of the decoder, so frames the stride skips across a GOP are never decoded."""
    index_of = {p: i for i, p in enumerate(table.pts)}
    out, frames, pos = [], None, -1
    for target in wanted:
        kf = table.key_before[target]
        if frames is None or kf > pos + 1:
            src.container.seek(table.pts[kf], stream=src.stream, backward=True)
            frames, pos = src.container.decode(src.stream), -1
        while pos < target:
            frame = next(frames, None)
            src.decoded += 1
            if frame is None or frame.pts not in index_of:
                raise _Mismatch(f"frame {target}")
            pos = index_of[frame.pts]
        if pos != target:
            raise _Mismatch(f"frame {target}")
        out.append(src.convert(frame))
    return out


def _decode_pass(src: _Source, cfg: VideoConfig, segment: int) -> tuple[FrameTable, list[np.ndarray]]:
    """Decode from the start, sampling as we go; keep only the segment's frames (bounded memory)."""
    sampler, kept, frames, n = _Sampler(cfg, src.fps), [], [], 0
    lo = segment * (cfg.max_frames - cfg.segment_overlap)
    hi = lo + cfg.max_frames if cfg.max_frames else None
    try:
        for frame in src.container.decode(src.stream):
            n += 1
            src.decoded += 1
            if not sampler.keep(src.time(frame.pts)):
                continue
            if lo <= len(kept) and (hi is None or len(kept) < hi):
                frames.append(src.convert(frame))
            kept.append(n - 1)
            if cfg.long_videos == "truncate" and cfg.max_frames and len(kept) >= cfg.max_frames:
                break  # the rest would be thrown away
    except (av.error.FFmpegError, EOFError) as e:
        raise VideoRejected(f"decode error after {n} frames: {e}") from None
    return FrameTable(n, kept, float(sampler.fps)), frames


def decode_segment(uri: str, cfg: VideoConfig, storage_options: dict | None = None, segment: int = 0,
                   table: Optional[FrameTable] = None, threads: int = 0) -> DecodedVideo:
    """Read `uri` (any fsspec URL) and return the sampled, resized, cropped uint8 frames of one segment
    (`segment_bounds`). Segment 0 probes the file; give its `.table` to the other segments' calls."""
    frames, decoded = None, 0
    with _fetched(uri, storage_options) as opener:
        with _open(opener, cfg, threads) as src:
            table = table or _probe(src, cfg)
            if table is not None and table.pts is not None:
                _check_count(table, segment, cfg)
                start, end = segment_bounds(len(table.kept), cfg)[segment]
                try:
                    frames = _decode_seeking(src, table, table.kept[start:end])
                except (_Mismatch, av.error.FFmpegError, EOFError):
                    frames = None  # the packets misled us: decode from the start below
            facts, decoded = src, src.decoded
        if frames is None:
            with _open(opener, cfg, threads) as src:
                table, frames = _decode_pass(src, cfg, segment)
                decoded += src.decoded
            _check_count(table, segment, cfg)
    bounds = segment_bounds(len(table.kept), cfg)
    start, end = bounds[segment]
    frames = frames[:end - start]
    geo = facts.geo
    meta = {"source_size": [facts.width, facts.height], "source_fps": facts.fps, "source_frames": table.num_frames,
            "sampled_frames": len(table.kept), "resized_size": list(geo.resized), "crop_box": list(geo.crop),
            "frame_size": list(geo.size), "truncated": bounds[-1][1] < len(table.kept) or (
                table.pts is None and cfg.long_videos == "truncate" and bool(cfg.max_frames)
                and len(table.kept) >= cfg.max_frames)}
    if len(bounds) > 1:
        meta.update(segment=segment, num_segments=len(bounds), first_frame=start,
                    segment_overlap=cfg.segment_overlap)
    return DecodedVideo(np.stack(frames), table.fps, table.kept[start:end], meta, segment, len(bounds), start, table,
                        decoded)


def _check_count(table: FrameTable, segment: int, cfg: VideoConfig) -> None:
    if len(table.kept) < cfg.min_frames:
        raise VideoRejected(f"too few frames: {len(table.kept)} sampled from {table.num_frames} decoded, "
                            f"need min_frames={cfg.min_frames}")
    n = len(segment_bounds(len(table.kept), cfg))
    if not 0 <= segment < n:
        raise VideoRejected(f"segment {segment} asked of a video with {n} segments (did the file change?)")


def decode_video(uri: str, cfg: VideoConfig, storage_options: dict | None = None, threads: int = 0) -> DecodedVideo:
    """The first segment: the whole video when it has at most max_frames sampled frames (or max_frames is 0)."""
    return decode_segment(uri, cfg, storage_options, 0, None, threads)


def iter_segments(uri: str, cfg: VideoConfig, storage_options: dict | None = None,
                  threads: int = 0) -> Iterator[DecodedVideo]:
    """Every segment of a video, one at a time (what the farm does across tasks)."""
    first = decode_segment(uri, cfg, storage_options, 0, None, threads)
    yield first
    for i in range(1, first.num_segments):
        yield decode_segment(uri, cfg, storage_options, i, first.table, threads)


def to_model_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in [-1, 1]."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # object-store arrays are read-only; torch wants to own writable memory
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (for inspection)."""
    y = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy()
