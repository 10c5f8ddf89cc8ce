"""Synthetic videos as real files (PyAV): for tests, the bench and the quickstart.

Smooth moving gradients with a bright square, so that codecs compress them
well and a resized frame stays close to the source; plus writers for the bad
inputs the farm must quarantine (empty, truncated, not a video).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import av
import numpy as np


def pattern_frames(width: int, height: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a drifting colour gradient and a moving square."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    side = max(8, min(width, height) // 4)
    for t in range(num_frames):
        for c in range(3):
            wave = np.sin(xx / width * 2 * np.pi + phase[c] + 0.2 * t) + np.cos(yy / height * np.pi + 0.1 * t * c)
            frames[t, :, :, c] = (127.5 + 60 * wave).clip(0, 255).astype(np.uint8)
        x0 = int((t * 7) % max(1, width - side))
        y0 = int((t * 3) % max(1, height - side))
        frames[t, y0:y0 + side, x0:x0 + side] = 235
    return frames


def bouncing_square_frames(size: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3]: one coloured square moving at a constant velocity, bouncing off the
    walls. The future is predictable from two frames of the past, which is what the quickstart's
    prediction is judged on. Square and background have one colour each for every video: a VAE
    built of GroupNorm layers cannot tell flat regions of different absolute colour apart, and a
    tiny one fitted for a minute renders any square colour as the mean one (measured: 18 dB on the
    square's pixels with random colours), which would judge the VAE rather than the prediction."""
    rng = np.random.default_rng(seed)
    side = size // 4
    background = np.array([24, 28, 40], np.uint8)
    colour = np.array([235, 225, 200], np.uint8)
    pos = rng.uniform(0, size - side, size=2)
    vel = rng.uniform(2.0, 4.0, size=2) * rng.choice([-1.0, 1.0], size=2) * size / 64
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = background
        y, x = (int(round(v)) for v in pos)
        frames[t, y:y + side, x:x + side] = colour
        pos = pos + vel
        for axis in range(2):  # reflect at the walls
            if pos[axis] < 0 or pos[axis] > size - side:
                vel[axis] = -vel[axis]
                pos[axis] = -pos[axis] if pos[axis] < 0 else 2 * (size - side) - pos[axis]
    return frames


def write_video(path: str | Path, frames, fps: int, codec: str = "mpeg4", options: dict | None = None) -> Path:
    """Encode uint8 [H, W, 3] frames (an array [T, H, W, 3] or any iterable of frames, even sides) with
    PyAV; container from the suffix. `options`: the encoder's (e.g. GOP, B-frames); mpeg4 defaults to
    near-lossless, since tests compare against the source."""
    path = Path(path)
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = options if options is not None else {"qscale": "2"} if codec == "mpeg4" else {}
        for f in itertools.chain([first], frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_bad_inputs(folder: str | Path, good_example: Path | None = None) -> dict[str, str]:
    """Files that are not decodable videos: name -> what is wrong with it."""
    folder = Path(folder)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    out = {"empty.mp4": "empty file", "text.mp4": "not a readable video container"}
    if good_example is not None:
        data = good_example.read_bytes()
        (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
        out["truncated.mp4"] = "truncated"
    return out
