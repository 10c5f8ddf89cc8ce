"""Checkpoints on object storage (s3://bucket/prefix, or any fsspec URL): what
`vgpt ckpt list`, `verify` and `export` need, without copying the run first.

Credentials come only from the environment, through the storage library's
own chain (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles); nothing here accepts or prints them. The endpoint (an S3
compatible store) comes from `--endpoint-url`, else AWS_ENDPOINT_URL_S3, else
AWS_ENDPOINT_URL. Listings are never cached: a checkpoint committed since the
last call must show.

`verify` streams every file through sha256 against the checkpoint's manifest.
`fetch` (for export) downloads a checkpoint into a local directory while
hashing it and reports any mismatch before a DeepSpeed pickle is opened; the
export itself is then the local one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pretrain.checkpoint.integrity import BLOCK, MANIFEST, BlockHasher, matches
from pretrain.checkpoint.manager import TRAINER_STATE

CHUNK = 1 << 22


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def storage_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for `url`: endpoint and no listing cache; never credentials."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict = {"use_listings_cache": False, "skip_instance_cache": True}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


class RemoteRoot:
    """A run's checkpoint root at an fsspec URL (the run's out_dir or its checkpoints/ folder)."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        import fsspec

        self.protocol = url.split("://", 1)[0]
        self.fs, path = fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url))
        path = path.rstrip("/")
        self.root = f"{path}/checkpoints" if self.fs.isdir(f"{path}/checkpoints") else path

    def url(self, *parts: str) -> str:
        return f"{self.protocol}://" + "/".join([self.root, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self) -> bool:
        return self.fs.isdir(self.root)

    def tags(self) -> list[str]:
        entries = self.fs.ls(self.root, detail=True)
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if n.startswith("step_"))

    def read_json(self, *parts: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(*parts)))
        except FileNotFoundError:
            return None

    def latest(self) -> str | None:
        try:
            return self.fs.cat_file(self._path("latest")).decode().strip()
        except FileNotFoundError:
            return None

    def size(self, tag: str) -> int:
        return sum(info["size"] for info in self.fs.find(self._path(tag), detail=True).values())

    def is_complete(self, tag: str) -> bool:
        return self.fs.exists(self._path(tag, MANIFEST))

    def newest_complete(self) -> str | None:
        return next((t for t in reversed(self.tags()) if self.is_complete(t)), None)

    def _manifest(self, tag: str) -> tuple[dict | None, list[str]]:
        try:
            return self.read_json(tag, MANIFEST), []
        except json.JSONDecodeError as e:
            return None, [f"{self.url(tag, MANIFEST)}: unreadable ({e})"]

    def _check(self, tag: str, rel: str, info: dict, sink=None) -> str | None:
        """Stream one file through sha256 (and into `sink`); a problem line, or None."""
        url = self.url(tag, rel)
        try:
            size = self.fs.size(self._path(tag, rel))
        except FileNotFoundError:
            return f"{url}: missing"
        if size != info["bytes"]:
            return f"{url}: {size} bytes, manifest says {info['bytes']}"
        blocks = BlockHasher(info.get("block_bytes", BLOCK))
        whole = hashlib.sha256()  # manifests written before block hashes
        with self.fs.open(self._path(tag, rel), "rb", block_size=CHUNK) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                (blocks if "sha256_blocks" in info else whole).update(chunk)
                if sink is not None:
                    sink.write(chunk)
        digest = blocks.digest() if "sha256_blocks" in info else whole.hexdigest()
        return None if matches(info, digest) else f"{url}: sha256 mismatch"

    def verify(self, tag: str) -> list[str]:
        """Problems with one checkpoint ([] when complete): every file re-hashed as it streams."""
        manifest, problems = self._manifest(tag)
        if problems:
            return problems
        if manifest is None:
            return [f"{self.url(tag, MANIFEST)}: missing (save did not finish)"]
        return [p for rel, info in manifest["files"].items() if (p := self._check(tag, rel, info))]

    def fetch(self, tag: str, dest: Path) -> list[str]:
        """Download checkpoint `tag` into `dest` (a local checkpoint directory), hashing every file on
        the way; the problems found ([] = `dest` is a verified copy, manifest included)."""
        manifest, problems = self._manifest(tag)
        if problems or manifest is None:
            return problems or [f"{self.url(tag, MANIFEST)}: missing (save did not finish)"]
        dest.mkdir(parents=True, exist_ok=True)
        for rel, info in manifest["files"].items():
            target = dest / rel
            if dest.resolve() not in target.resolve().parents:
                problems.append(f"{self.url(tag, MANIFEST)}: file name {rel!r} points outside the checkpoint")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as sink:
                if problem := self._check(tag, rel, info, sink):
                    problems.append(problem)
        (dest / MANIFEST).write_text(json.dumps(manifest))
        return problems

    def trainer_state(self, tag: str) -> dict:
        return self.read_json(tag, TRAINER_STATE) or {}
