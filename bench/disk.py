"""Raw disk figures the benches compare against: page-cache eviction and a sequential read.

Shared by bench/loader.py and bench/checkpoint.py so that both measure "raw"
the same way (4 MiB unbuffered reads, files evicted with posix_fadvise).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

CHUNK = 4 << 20


def drop_cache(paths: list[str] | list[Path]) -> None:
    """Evict these files (only these) from the page cache: the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[str] | list[Path], cold: bool = False) -> float:
    """Seconds to read every file sequentially, cat-style; from the disk when `cold`."""
    if cold:
        drop_cache(paths)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(CHUNK):
                pass
    return time.perf_counter() - t
