"""Checkpoint file integrity at disk speed: block-wise checksums, hashed while written, fsynced.

What: a checkpoint is committed by its manifest (`write_manifest`, written
last), whose entry per file is its size and the CRC-32 of each 64 MiB block
(`crc32_blocks`), and which carries the sha256 of its own contents
(`manifest_sha256`). Manifests written before (`sha256_blocks` per block, or
one whole-file `sha256`) still verify.
`HashingWriter` is the file every checkpoint file is written through
(safetensors_stream.py; deepspeed_files.py for the legacy .pt writer): the
writing rank checksums the bytes on a thread of its own, from memory, while it
keeps writing, and fsyncs the file before the manifest vouches for it.
storage.py verifies against the manifest.

Why CRC-32 per block: the checksums guard against corruption (a torn write, a
bad disk, a truncated upload), not against tampering (nothing we write is ever
unpickled, so a forged file can only hold wrong numbers). zlib's CRC-32 runs
at about twice sha256's speed per core (1.5 vs 0.8 GB/s here) and releases the
GIL; the small manifest itself is sha256-hashed. Why blocks: one checksum
stream is one core's speed, below a local disk (2-3 GB/s) and far below a
parallel file system; fixed blocks let a thread pool verify one file on every
core before a resume. Checksumming by the writing rank, from the bytes it
writes, costs no read back and spreads the work over the ranks instead of
making rank 0 re-read every shard; the fsync makes `latest` never point at
data still in a page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobconfig.errors import ConfigError

BLOCK = 64 << 20
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    # a forked child inherits the executor but not its threads: it would queue work nobody runs
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        # a few threads per rank: a node runs several ranks, and hashing is not all they do
        _POOL = ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 2)), thread_name_prefix="ckpt-hash")
    return _POOL


CRC32 = "crc32_blocks"
SHA256 = "sha256_blocks"  # manifests written before CRC-32 blocks


class _Crc32:
    """hashlib-like CRC-32 (zlib releases the GIL on large buffers)."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def new_hasher(kind: str = CRC32):
    return _Crc32() if kind == CRC32 else hashlib.sha256()


def block_kind(info: dict[str, Any]) -> str | None:
    """Which per-block checksum a manifest entry holds (None: one whole-file sha256)."""
    return CRC32 if CRC32 in info else SHA256 if SHA256 in info else None


def _hash_block(fd: int, offset: int, length: int, kind: str = CRC32) -> str:
    h = new_hasher(kind)
    done = 0
    while done < length:
        chunk = os.pread(fd, min(8 << 20, length - done), offset + done)
        if not chunk:
            raise OSError(f"file shrank while hashing (at byte {offset + done})")
        h.update(chunk)
        done += len(chunk)
    return h.hexdigest()


def hash_file(path: str | Path, block: int = BLOCK, kind: str = CRC32) -> dict[str, Any]:
    """Manifest entry of one file: its size and the checksum of every block, hashed in parallel."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        jobs = [pool().submit(_hash_block, fd, off, min(block, size - off), kind) for off in range(0, size, block)]
        blocks = [j.result() for j in jobs] or [new_hasher(kind).hexdigest()]
    finally:
        os.close(fd)
    return {"bytes": size, "block_bytes": block, kind: blocks}


def matches(info: dict[str, Any], digest: list[str] | str) -> bool:
    kind = block_kind(info)
    return digest == (info[kind] if kind else info["sha256"])


def check_file(path: Path, info: dict[str, Any]) -> str | None:
    """A problem line for `path` against its manifest entry, or None when it matches."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"{path}: {size} bytes, manifest says {info['bytes']}"
    if kind := block_kind(info):
        ok = matches(info, hash_file(path, info.get("block_bytes", BLOCK), kind)[kind])
    else:  # a manifest of one whole-file hash (written before block hashes)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        ok = matches(info, h.hexdigest())
    return None if ok else f"{path}: checksum mismatch"


class BlockHasher:
    """Incremental block hashes of a byte stream (for readers that stream, e.g. from object storage)."""

    def __init__(self, block: int = BLOCK, kind: str = CRC32):
        self.kind = kind
        self.block, self.blocks, self._h, self._n = block, [], new_hasher(kind), 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.block - self._n)
            self._h.update(view[:take])
            self._n += take
            view = view[take:]
            if self._n == self.block:
                self.blocks.append(self._h.hexdigest())
                self._h, self._n = new_hasher(self.kind), 0

    def digest(self) -> list[str]:
        return self.blocks + [self._h.hexdigest()] if self._n or not self.blocks else list(self.blocks)


class HashingWriter:
    """A write-only file that checksums what it writes on a thread of its own while the caller keeps
    writing (the bytes are hashed from memory, not read back), fsyncs on `close` and returns the
    manifest entry. With `stable_buffers` the caller promises not to change a buffer it has passed to
    `write` before `close` (the checkpoint writer's host copies), and nothing is copied; otherwise
    (torch.save reuses its buffers) each write is copied for the checksum thread.
    `on_write(n)` is called after each write (fault injection in tests)."""

    def __init__(self, path: str | Path, on_write=None, stable_buffers: bool = False):
        self.on_write, self.stable = on_write, stable_buffers
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, as open() does
        self.pos = 0
        self.blocks: list[str] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hash, name="ckpt-crc", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        crc, filled = 0, 0
        try:
            while (view := self._queue.get()) is not None:
                while len(view):
                    take = min(len(view), BLOCK - filled)
                    crc, filled = zlib.crc32(view[:take], crc), filled + take
                    view = view[take:]
                    if filled == BLOCK:
                        self.blocks.append(f"{crc:08x}")
                        crc, filled = 0, 0
            if filled or not self.blocks:
                self.blocks.append(f"{crc:08x}")
        except BaseException as e:  # noqa: BLE001 - raised by close()
            self._error = e

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # os.write may write less than asked
            done += os.write(self.fd, view[done:])
        self.pos += done
        self._queue.put(view if self.stable else bytes(view))
        if self.on_write:
            self.on_write(done)
        return done

    def flush(self) -> None:
        pass

    def close(self) -> dict[str, Any]:
        try:
            self._queue.put(None)
            os.fsync(self.fd)
            self._thread.join()
        finally:
            os.close(self.fd)
        if self._error is not None:
            raise self._error
        return {"bytes": self.pos, "block_bytes": BLOCK, CRC32: self.blocks}


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


class RefusedFile(CheckpointError, ConfigError):
    """A checkpoint file we will not read: it holds objects other than the ones allowed (a pickled
    payload). No retry can change that, so it is bad input: one line, exit status 2, and under torchrun
    no restart is spent on it (orchestration/launch/local_torchrun.py)."""


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
    manifest = {"tag": ckpt.name, "step": step, "files": files}
    atomic_write(ckpt / MANIFEST, json.dumps({**manifest, "manifest_sha256": manifest_digest(manifest)}, indent=1))


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's contents (without its own digest), in a canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_problem(manifest: dict[str, Any], where: str) -> str | None:
    """A problem line when a manifest does not match its own sha256 (older manifests carry none)."""
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
        return f"{where}: manifest contents do not match its manifest_sha256 (corrupt or edited)"
    if not isinstance(manifest.get("files"), dict):
        return f"{where}: no 'files' table"
    return None
