"""Videos: the unit the loader samples, grouped from the stored samples without reading a shard.

A long input video is stored as several samples, its *segments* (data/video.py `segment_bounds`;
keys `<key>-s0000`, `<key>-s0001`, ...: data/precompute_plan.py `segment_key`), consecutive in one
shard, each recording the index of its first frame in the whole video (the index column
`sample_first_frame`, written by the precompute job and by data/synthetic's toy writer). Segments
stay the unit of storage and of precompute work; the *video* is the unit of sampling (METHOD.md,
"Sampling": one window per video per epoch, starting anywhere in the whole video). So the data
order (data/order.py), the shape buckets and the early skips (data/buckets.py) count videos: a
video of 40 segments is one sample of the epoch, not 40; a video is too short for a stage by its
whole length; its window may cross a segment edge, and the loader then reads only the segments the
window touches (usually one or two, `Videos.pieces`) and cuts its frames from each.

Grouping, from the index columns alone: a video starts at every sample whose first frame is 0 and
runs over the samples after it in flat order (shards in index order, then order in the shard).
Checked once per index, refused naming the key otherwise: every shard starts with a video (a video
never spans shards, so the order's per-shard arithmetic holds and an index prefix of old shards
groups as before); within a video first frames and ends increase with no gap (consecutive segments
may overlap, `segment_overlap`) and the segments share one latent [C, h, w]. A video's frame count
is the end of its last segment. Where segments overlap, a frame is read from the earliest segment
that holds it: the frames are the same (data/vae.py seeds each frame by its index in the input).

An index without the column (written before it was recorded, or without per-sample shapes) is
read as before: every sample its own video, with the order, skips and keys of before, so its
checkpoints still resume. The held-out split groups segments by key in every case
(data/heldout_split.py): all segments of one video fall on the same side.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from data.dataset_index import DatasetMeta
from data.precompute_plan import source_key
from data.shard_format import ShardFormatError


def _rebuilt(meta: DatasetMeta) -> "Videos":
    return Videos.of(meta)


@dataclass(frozen=True, eq=False)  # compared by identity: `starts` is an array
class Videos:
    """The videos of a dataset: video v is the flat samples [starts[v], starts[v+1]) (one sample per
    video when `starts` is None). Videos are numbered like samples: shard by shard, `offsets[shard]`
    + index in the shard. Pickles as its DatasetMeta (a worker regroups instead of getting a copy)."""
    meta: DatasetMeta
    starts: np.ndarray | None = None  # [V + 1]: flat sample index of each video's first segment, then N

    def __reduce__(self):
        return _rebuilt, (self.meta,)

    @classmethod
    def of(cls, meta: DatasetMeta) -> "Videos":
        """Group `meta`'s samples into videos by their first frames, checking the grouping (module doc)."""
        first = meta.first_frames
        if first is None or not meta.has_shapes or not np.any(first):
            return cls(meta)  # nothing recorded, or every sample a whole video: one sample per video
        first = np.asarray(first, dtype=np.int64)
        end = first + np.asarray(meta.frames, dtype=np.int64)
        N = len(first)
        cont = first != 0  # the sample continues the video of the one before it
        bad = np.flatnonzero(cont[meta.offsets])
        if len(bad):
            i = int(meta.offsets[bad[0]])
            raise ShardFormatError(f"{meta.where}: shard {meta.names[bad[0]]} starts with sample {meta.key(i)!r} of "
                                   f"first frame {first[i]}: a segment whose video starts in another shard (the "
                                   "segments of a video must be consecutive samples of one shard)")
        prev = np.flatnonzero(cont) - 1
        shape_ids = np.asarray(meta.shape_ids)
        broken = (first[prev + 1] <= first[prev]) | (first[prev + 1] > end[prev]) | (end[prev + 1] <= end[prev]) \
            | (shape_ids[prev + 1] != shape_ids[prev])
        if broken.any():
            i = int(prev[np.argmax(broken)]) + 1
            raise ShardFormatError(f"{meta.where}: sample {meta.key(i)!r} (frames {first[i]}..{end[i] - 1}, latent "
                                   f"{meta.sample_shape(i)[1:]}) does not continue {meta.key(i - 1)!r} (frames "
                                   f"{first[i - 1]}..{end[i - 1] - 1}, latent {meta.sample_shape(i - 1)[1:]}): a "
                                   "video's segments must follow each other without a gap, in one latent shape")
        dtype = np.int32 if N < 2 ** 31 else np.int64
        return cls(meta, np.append(np.flatnonzero(~cont), N).astype(dtype))

    # ------------------------------------------------------------ counts
    @property
    def grouped(self) -> bool:
        """Whether some video has several segments (else every sample is its own video)."""
        return self.starts is not None

    @cached_property
    def num(self) -> int:
        return self.meta.num_samples if self.starts is None else len(self.starts) - 1

    @cached_property
    def offsets(self) -> np.ndarray:
        """Flat video index of each shard's first video."""
        if self.starts is None:
            return self.meta.offsets
        return np.searchsorted(self.starts, self.meta.offsets).astype(np.int64)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Videos per shard: what the epoch order (data/order.py) permutes and cuts."""
        if self.starts is None:
            return self.meta.sizes
        return tuple(np.diff(np.append(self.offsets, self.num)).tolist())

    # ------------------------------------------------------------ per-video columns
    @cached_property
    def frames(self) -> np.ndarray | None:
        """[V] each video's stored frames, all segments together (None when the index records no shapes)."""
        m = self.meta
        if self.starts is None or m.frames is None:
            return m.frames
        last = self.starts[1:] - 1
        return (np.asarray(m.first_frames[last], dtype=np.int64) + m.frames[last]).astype(np.int32)

    @cached_property
    def shape_ids(self) -> np.ndarray | None:
        """[V] each video's row of `meta.shape_table` (its segments share it)."""
        if self.starts is None or self.meta.shape_ids is None:
            return self.meta.shape_ids
        return np.asarray(self.meta.shape_ids)[self.starts[:-1]]

    def first_sample(self, v: int) -> int:
        return v if self.starts is None else int(self.starts[v])

    def samples(self, v: int) -> tuple[int, int]:
        """[lo, hi): the flat sample indices of video v's segments."""
        return (v, v + 1) if self.starts is None else (int(self.starts[v]), int(self.starts[v + 1]))

    def shape(self, v: int) -> list[int]:
        """[T, C, h, w] of video v: its whole frame count, its latent shape."""
        if self.starts is None:
            return self.meta.sample_shape(v)
        return [int(self._frames[v]), *self._table[int(self._shape_ids[v])]]

    @cached_property
    def _frames(self) -> np.ndarray:
        return np.asarray(self.frames)

    @cached_property
    def _shape_ids(self) -> np.ndarray:  # plain ndarray views: per-item indexing of a memmap costs 4x more
        return np.asarray(self.shape_ids)

    @cached_property
    def _table(self) -> list[list[int]]:
        return self.meta.shape_table.tolist()

    def key(self, v: int, sample_key: str) -> str:
        """Video v's key from the key of one of its segments: the input's key (data/precompute_plan.py
        `source_key`) for a video of several segments, else the sample's own key."""
        lo, hi = self.samples(v)
        return source_key(sample_key) if hi - lo > 1 else sample_key

    # ------------------------------------------------------------ reading a window
    def pieces(self, v: int, frame_indices: tuple[int, ...], interval: int) -> list[tuple[int, int, int]]:
        """The segments a window of video v reads: (flat sample index, start, stop) per segment, in order,
        such that segment[start:stop:interval] are its frames of the window (indices in the segment).
        A frame lies in the earliest segment that holds it; every frame of the window is in one piece."""
        lo, hi = self.samples(v)
        start, stop = frame_indices[0], frame_indices[-1] + 1
        if hi - lo == 1:
            return [(lo, start, stop)]
        first = np.asarray(self.meta.first_frames[lo:hi], dtype=np.int64).tolist()
        ends = [f + int(n) for f, n in zip(first, self.meta.frames[lo:hi])]
        out, f = [], start
        while f < stop:
            k = bisect.bisect_right(first, f) - 1  # the last segment starting at or before f: it holds f
            e = min(ends[k], stop)
            out.append((lo + k, f - first[k], e - first[k]))
            f += -(-(e - f) // interval) * interval  # the window's next frame at or after e
        return out


def cut_window(parts: list[torch.Tensor], pieces: list[tuple[int, int, int]], interval: int) -> torch.Tensor:
    """The window's frames from its segments' latents (`parts`, aligned with `pieces`): a strided view of
    the one segment, or the frames of several concatenated. Only the frame axis is indexed, so any
    channel layout (a posterior's 2C channels) passes as it is."""
    if len(parts) == 1:
        (_, a, b), = pieces
        return parts[0][a:b:interval]
    return torch.cat([x[a:b:interval] for x, (_, a, b) in zip(parts, pieces)])
