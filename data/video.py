"""Video -> model-ready frames: decode (PyAV), sample, resize, crop, normalise.

Any container/codec FFmpeg reads works; the file is opened through fsspec so
inputs can be local or on object storage. Geometry follows METHOD.md (and the
reference's `crop_arr`): resize so the long side is at most `max_image_size`
(bicubic, aspect kept, sides rounded), then center-crop both sides down to
multiples of 16, putting the odd pixel at the end. Rejection rules (too few
frames, a side < min_side, aspect beyond max_aspect, unreadable input) raise
`VideoRejected` with a reason; the farm quarantines those inputs instead of
crashing. Frames stay uint8 until the encoder so that decoded videos cost 4x
less in the object store than float frames would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import av
import numpy as np
import torch

from data.shard_format import get_fs
from jobconfig.precompute import VideoConfig


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
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3], H and W multiples of 16
    fps: float  # rate of the stored frames
    frame_indices: list[int]  # index of each stored frame among the decoded source frames
    meta: dict = field(default_factory=dict)  # source facts for meta.json


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


def decode_video(uri: str, cfg: VideoConfig, storage_options: dict | None = None) -> DecodedVideo:
    """Read `uri` (any fsspec URL) and return its sampled, resized, cropped uint8 frames."""
    fs, path = get_fs(uri, storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise VideoRejected("file not found") from None
    if not size:
        raise VideoRejected("empty file (0 bytes)")
    with fs.open(path, "rb") as f:
        try:
            container = av.open(f, mode="r")
        except (av.error.FFmpegError, ValueError, EOFError) as e:
            raise VideoRejected(f"not a readable video container: {e}") from None
        with container:
            if not container.streams.video:
                raise VideoRejected("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            width, height = stream.codec_context.width, stream.codec_context.height
            if not width or not height:
                raise VideoRejected(f"video stream has no frame size ({width}x{height})")
            check_source(width, height, cfg)
            src_fps = _source_fps(stream)
            if cfg.sample_fps is None and src_fps <= 0:
                raise VideoRejected("unknown frame rate and no sample_fps configured")
            geo = target_geometry(width, height, cfg.max_image_size)
            sampler = _Sampler(cfg, src_fps)
            frames, indices, decoded = [], [], 0
            left, top, right, bottom = geo.crop
            try:
                for frame in container.decode(stream):
                    decoded += 1
                    if not sampler.keep(None if frame.pts is None else float(frame.pts * stream.time_base)):
                        continue
                    rgb = frame.reformat(width=geo.resized[0], height=geo.resized[1], format="rgb24",
                                         interpolation="BICUBIC").to_ndarray()
                    frames.append(np.ascontiguousarray(rgb[top:bottom, left:right]))
                    indices.append(decoded - 1)
                    if cfg.max_frames and len(frames) >= cfg.max_frames:
                        break
            except (av.error.FFmpegError, EOFError) as e:
                raise VideoRejected(f"decode error after {decoded} frames: {e}") from None
    if len(frames) < cfg.min_frames:
        raise VideoRejected(f"too few frames: {len(frames)} sampled from {decoded} decoded, "
                            f"need min_frames={cfg.min_frames}")
    meta = {"source_size": [width, height], "source_fps": src_fps, "source_frames_decoded": decoded,
            "resized_size": list(geo.resized), "crop_box": list(geo.crop), "frame_size": list(geo.size),
            "truncated": bool(cfg.max_frames and len(frames) >= cfg.max_frames)}
    return DecodedVideo(np.stack(frames), float(sampler.fps), indices, meta)


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
