"""Checkpoint file integrity at disk speed: block-wise sha256, hashed while written, fsynced.

What: a checkpoint is committed by its manifest (`write_manifest`, written
last), whose entry per file is its size and the sha256 of each 64 MiB block
(`sha256_blocks`); older manifests with one whole-file `sha256` still verify.
`HashingWriter` is the file object the DeepSpeed writer saves through
(deepspeed_files.py), so that each rank hashes the files it writes while
`torch.save` is still writing them, and fsyncs them, before the manifest
vouches for them. storage.py verifies against the manifest.

Why: one sha256 stream runs at ~1 GB/s per core, below a local disk (2-3
GB/s here) and far below a parallel file system. Hashing fixed blocks lets a
thread pool hash one file on every core (hashlib releases the GIL), both when
saving (blocks are hashed from the page cache while later blocks are still
being written) and when verifying before a resume. Hashing by the writing rank
also spreads the work over the ranks instead of making rank 0 re-read every
shard, and the fsync makes `latest` never point at data still in a page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

BLOCK = 64 << 20
_POOL: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        # a few threads per rank: a node runs several ranks, and hashing is not all they do
        _POOL = ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 2)), thread_name_prefix="ckpt-hash")
    return _POOL


def _hash_block(fd: int, offset: int, length: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < length:
        chunk = os.pread(fd, min(8 << 20, length - done), offset + done)
        if not chunk:
            raise OSError(f"file shrank while hashing (at byte {offset + done})")
        h.update(chunk)
        done += len(chunk)
    return h.hexdigest()


def hash_file(path: str | Path, block: int = BLOCK) -> dict[str, Any]:
    """Manifest entry of one file: its size and the sha256 of every block, hashed in parallel."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        jobs = [pool().submit(_hash_block, fd, off, min(block, size - off)) for off in range(0, size, block)]
        blocks = [j.result() for j in jobs] or [hashlib.sha256(b"").hexdigest()]
    finally:
        os.close(fd)
    return {"bytes": size, "block_bytes": block, "sha256_blocks": blocks}


def matches(info: dict[str, Any], digest: list[str] | str) -> bool:
    want = info["sha256_blocks"] if "sha256_blocks" in info else info["sha256"]
    return digest == want


def check_file(path: Path, info: dict[str, Any]) -> str | None:
    """A problem line for `path` against its manifest entry, or None when it matches."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"{path}: {size} bytes, manifest says {info['bytes']}"
    if "sha256_blocks" in info:
        ok = matches(info, hash_file(path, info.get("block_bytes", BLOCK))["sha256_blocks"])
    else:  # a manifest of one whole-file hash (written before block hashes)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        ok = matches(info, h.hexdigest())
    return None if ok else f"{path}: sha256 mismatch"


class BlockHasher:
    """Incremental block hashes of a byte stream (for readers that stream, e.g. from object storage)."""

    def __init__(self, block: int = BLOCK):
        self.block, self.blocks, self._h, self._n = block, [], hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.block - self._n)
            self._h.update(view[:take])
            self._n += take
            view = view[take:]
            if self._n == self.block:
                self.blocks.append(self._h.hexdigest())
                self._h, self._n = hashlib.sha256(), 0

    def digest(self) -> list[str]:
        return self.blocks + [self._h.hexdigest()] if self._n or not self.blocks else list(self.blocks)


class HashingWriter:
    """A write-only file for torch.save: every completed block is hashed from the page cache by the
    pool while torch keeps writing; `close` hashes the tail, fsyncs and returns the manifest entry."""

    def __init__(self, path: str | Path):
        # read-write: the pool preads the blocks back through the same descriptor
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos, self.submitted = 0, 0
        self.jobs: list[Future] = []

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # os.write may write less than asked
            done += os.write(self.fd, view[done:])
        self.pos += done
        while self.pos - self.submitted >= BLOCK:
            self.jobs.append(pool().submit(_hash_block, self.fd, self.submitted, BLOCK))
            self.submitted += BLOCK
        return done

    def flush(self) -> None:
        pass

    def close(self) -> dict[str, Any]:
        try:
            if self.pos > self.submitted or self.pos == 0:
                self.jobs.append(pool().submit(_hash_block, self.fd, self.submitted, self.pos - self.submitted))
            os.fsync(self.fd)
            blocks = [j.result() for j in self.jobs]
        finally:
            os.close(self.fd)
        return {"bytes": self.pos, "block_bytes": BLOCK, "sha256_blocks": blocks}


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt: Path, step: int, known: dict[str, dict] | None = None) -> None:
    """Size and block sha256s of every file under `ckpt`; written last, it is the commit.
    `known`: entries already hashed (and fsynced) by the ranks that wrote those files."""
    known = known or {}
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        rel = str(p.relative_to(ckpt))
        entry = known.get(rel)
        if entry is None or entry["bytes"] != p.stat().st_size:  # not hashed by its writer
            fsync_path(p)
            entry = hash_file(p)
        files[rel] = entry
    atomic_write(ckpt / MANIFEST, json.dumps({"tag": ckpt.name, "step": step, "files": files}, indent=1))
