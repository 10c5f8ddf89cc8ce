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
A read error (network, throttling) is retried and then raised as such: it says
nothing about the data, so it is never skipped as corruption.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import fsspec

from data.order import DatasetMeta
from data.shard_format import ShardFormatError, iter_tar

READ_ATTEMPTS = 3


class CorruptShardError(ShardFormatError):
    """A shard cannot be trusted; the message names it and says why."""


def shard_path(root: str, name: str) -> str:
    return f"{root}/shards/{name}.tar"


def load_shard(fs: fsspec.AbstractFileSystem, root: str, meta: DatasetMeta, shard: int,
               keep: set[int] | None = None, verify: bool = True) -> dict[int, tuple[str, dict[str, bytes]]]:
    """Sample index -> (key, members) of one verified shard, restricted to `keep`."""
    path = shard_path(root, meta.names[shard])
    for attempt in range(READ_ATTEMPTS):
        try:
            data = fs.cat_file(path)
            break
        except FileNotFoundError:
            raise CorruptShardError(f"shard {path}: listed in index.json but missing") from None
        except OSError as e:  # transient (network, throttling): retried, and never taken for corruption
            if attempt == READ_ATTEMPTS - 1:
                raise OSError(f"shard {path}: read failed {READ_ATTEMPTS} times: {e}") from e
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


class ShardSource:
    """Needed samples of the shards of one epoch, fetched ahead in first-need order."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, meta: DatasetMeta,
                 prefetch: int = 2, verify: bool = True):
        self.fs, self.root, self.meta, self.verify = fs, root, meta, verify
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(prefetch, thread_name_prefix="shard") if prefetch else None
        self._pending: dict[int, Future] = {}
        self._loaded: dict[int, dict | CorruptShardError] = {}
        self._needed: dict[int, set[int]] = {}
        self._left: dict[int, int] = {}
        self._queue: list[int] = []
        self._next = 0

    def begin_epoch(self, needs: Iterable[tuple[int, int]]) -> None:
        """`needs`: (shard, sample index) in the order they will be taken."""
        self._needed, self._queue, self._next = {}, [], 0
        self._loaded.clear()
        for shard, idx in needs:
            if shard not in self._needed:
                self._needed[shard] = set()
                self._queue.append(shard)
            self._needed[shard].add(idx)
        self._left = {s: len(v) for s, v in self._needed.items()}
        self._fill()

    def _fetch(self, shard: int):
        try:
            return load_shard(self.fs, self.root, self.meta, shard, self._needed[shard], self.verify)
        except CorruptShardError as e:
            return e

    def _fill(self) -> None:
        if self._pool is None:
            return
        while self._next < len(self._queue) and len(self._pending) < self.prefetch:
            shard = self._queue[self._next]
            self._next += 1
            self._pending[shard] = self._pool.submit(self._fetch, shard)

    def take(self, shard: int, idx: int) -> tuple[str, dict[str, bytes]] | CorruptShardError:
        if shard not in self._loaded:
            if shard in self._pending:
                self._loaded[shard] = self._pending.pop(shard).result()
            else:  # not prefetched (prefetch 0, or needed out of first-need order): fetch now
                self._loaded[shard] = self._fetch(shard)
            self._fill()
        got = self._loaded[shard]
        item = got if isinstance(got, CorruptShardError) else got.pop(idx)
        self._left[shard] -= 1
        if self._left[shard] == 0:
            del self._loaded[shard]
        return item

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
