"""Fetching, verifying and parsing latent shards for one reader (a rank's DataLoader worker).

A shard is fetched whole through fsspec (one sequential read: a local file or
one S3 GET), checked against index.json (byte count and sha256) *before any of
its samples is used*, then parsed with `data.shard_format.iter_tar`: the shards are WebDataset
tars, read by the project's one tar reader rather than through webdataset's
pipeline, whose node/worker splitting and shuffle buffer cannot give an order
that is independent of the world size, nor exact resume (NOTES.md). Verifying first is what makes "never yields garbage"
hold: a streaming hash would only notice a bad shard after its samples were
already handed out. The price is that a shard is held in memory while its
samples are pending, so keep shards to a few hundred MB.

Only the samples this reader needs are kept; a shard is dropped as soon as its
last needed sample has been taken. Shards are fetched ahead in the order the
reader will first need them, `prefetch` at a time, by threads (file and S3
reads and hashlib release the GIL), which hides S3 latency.

A shard that fails (missing, wrong size, bad sha256, truncated tar, wrong
sample count) raises `CorruptShardError` naming the shard; the loader's
`corrupt_shards` policy decides whether that stops the run or skips the shard.
A read error (network, throttling) is retried with exponential backoff, counted
and logged (data/object_store.py), and then raised as such: it says nothing
about the data, so it is never skipped as corruption.
"""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import fsspec

from data.dataset_index import DatasetMeta
from data.object_store import retrying
from data.shard_format import ShardFormatError, iter_tar


class CorruptShardError(ShardFormatError):
    """A shard cannot be trusted; the message names it and says why."""


def shard_path(root: str, name: str) -> str:
    return f"{root}/shards/{name}.tar"


def load_shard(fs: fsspec.AbstractFileSystem, root: str, meta: DatasetMeta, shard: int,
               keep: set[int] | None = None, verify: bool = True) -> dict[int, tuple[str, dict[str, bytes]]]:
    """Sample index -> (key, members) of one verified shard, restricted to `keep`."""
    path = shard_path(root, meta.names[shard])
    try:  # transient errors (network, throttling) are retried with backoff, and never taken for corruption
        data = retrying(lambda: fs.cat_file(path), f"shard {path}")
    except FileNotFoundError:
        raise CorruptShardError(f"shard {path}: listed in index.json but missing") from None
    if len(data) != meta.num_bytes[shard]:
        raise CorruptShardError(f"shard {path}: {len(data)} bytes, index.json says {meta.num_bytes[shard]} "
                                f"(truncated or rewritten)")
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.sha256[shard]:
            raise CorruptShardError(f"shard {path}: sha256 {digest[:16]}... does not match index.json "
                                    f"{meta.sha256[shard][:16]}... (corrupt or rewritten)")
    out = {}
    count = 0
    try:
        for i, (key, members) in enumerate(iter_tar(data, where=path)):
            count += 1
            if keep is None or i in keep:
                out[i] = (key, members)
    except ShardFormatError as e:  # iter_tar's message starts with the path
        raise CorruptShardError(f"shard {e}") from None
    if count != meta.sizes[shard]:
        raise CorruptShardError(f"shard {path}: {count} samples, index.json says {meta.sizes[shard]}")
    return out


class _Visit:
    """One fetch of a shard for a run of takes: the sample indices still to take and the data."""

    def __init__(self, shard: int):
        self.shard, self.needed, self.left = shard, set(), 0
        self.future: Future | None = None
        self.data: dict | CorruptShardError | None = None


class ShardSource:
    """Needed samples of shards, fetched ahead in first-need order.

    `extend(needs)` appends (key, sample index) pairs in the order they will be taken, key being
    (epoch, shard): within one call a key is one fetch; a key given again in a later call (a shard
    of the next epoch, borrowed by a rolled step and then needed by the epoch itself) is fetched
    again, after the earlier fetch's samples are all taken."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, meta: DatasetMeta,
                 prefetch: int = 2, verify: bool = True):
        self.fs, self.root, self.meta, self.verify = fs, root, meta, verify
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(prefetch, thread_name_prefix="shard") if prefetch else None
        self._visits: dict[tuple[int, int], deque[_Visit]] = {}
        self._queue: deque[_Visit] = deque()   # visits not yet fetched, in first-need order
        self._inflight = 0                     # fetched ahead, not yet taken from

    def extend(self, needs: Iterable[tuple[tuple[int, int], int]]) -> None:
        new: dict[tuple[int, int], _Visit] = {}
        for key, idx in needs:
            v = new.get(key)
            if v is None:
                v = new[key] = _Visit(key[1])
                self._visits.setdefault(key, deque()).append(v)
                self._queue.append(v)
            v.needed.add(idx)
            v.left += 1
        self._fill()

    def _fetch(self, v: _Visit):
        try:
            return load_shard(self.fs, self.root, self.meta, v.shard, v.needed, self.verify)
        except CorruptShardError as e:
            return e

    def _fill(self) -> None:
        if self._pool is None:
            return
        while self._queue and self._inflight < self.prefetch:
            v = self._queue.popleft()
            v.future = self._pool.submit(self._fetch, v)
            self._inflight += 1

    def take(self, key: tuple[int, int], idx: int) -> tuple[str, dict[str, bytes]] | CorruptShardError:
        visits = self._visits[key]
        v = visits[0]
        if v.data is None:
            if v.future is not None:
                v.data = v.future.result()
                self._inflight -= 1
            else:  # not prefetched (prefetch 0, or needed out of first-need order): fetch now
                self._queue.remove(v)
                v.data = self._fetch(v)
            self._fill()
        item = v.data if isinstance(v.data, CorruptShardError) else v.data.pop(idx)
        v.left -= 1
        if v.left == 0:
            visits.popleft()
            if not visits:
                del self._visits[key]
        return item

    def close(self) -> None:
        if self._pool is not None:  # queued visits have no future yet; shutdown cancels unstarted fetches
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
