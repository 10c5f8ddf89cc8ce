"""Progress of a precompute job, printed by the driver (so it lands in `ray job logs`).

One line per committed shard and at most one per `every_s` seconds otherwise:
videos done/total, rejected, frames encoded, frames/s and ETA of this run.
"""
from __future__ import annotations

import time


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total_videos: int, done_before: int, total_shards: int, shards_before: int,
                 every_s: float, clock=time.monotonic):
        self.total, self.done_before = total_videos, done_before
        self.total_shards, self.shards = total_shards, shards_before
        self.videos = self.rejected = self.frames = 0
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()

    def restart(self) -> None:
        """Rates count from here: the encoders are up (start-up is not throughput)."""
        self.start = self.last = self.clock()

    def seconds(self) -> float:
        return self.clock() - self.start

    def video(self, frames: int = 0, rejected: bool = False) -> None:
        self.videos += 1
        self.rejected += int(rejected)
        self.frames += frames

    def line(self) -> str:
        elapsed = max(1e-9, self.clock() - self.start)
        done = self.done_before + self.videos
        rate = self.videos / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        return (f"[precompute] videos {done}/{self.total} (this run {self.videos}), rejected {self.rejected}, "
                f"frames {self.frames}, {self.frames / elapsed:.1f} frames/s, "
                f"shards {self.shards}/{self.total_shards}, "
                f"ETA {_hms(eta) if eta == eta else '?'}")

    def shard_committed(self, stem: str) -> None:
        self.shards += 1
        print(f"[precompute] committed {stem}", flush=True)
        self.print()

    def maybe_print(self) -> None:
        if self.clock() - self.last >= self.every_s:
            self.print()

    def print(self) -> None:
        self.last = self.clock()
        print(self.line(), flush=True)

    def frames_per_s(self) -> float:
        return self.frames / max(1e-9, self.clock() - self.start)
