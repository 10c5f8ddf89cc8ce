"""Where checkpoints live: one storage layer for a local path or an fsspec URL (s3://bucket/run).

A checkpoint root holds `step_NNNNNNNN/` directories (each committed by its
`manifest.json`, integrity.py) and a `latest` file naming the newest committed
one. `CheckpointStore` lists, reads, verifies and fetches them, written once
for both kinds of storage: the training run's manager uses it on its local
root, `vgpt ckpt` on local roots and object stores alike.

Verification re-hashes every file against the manifest, and then (full, on a
local directory or a fetched copy) checks that the files follow their schemas
and fit together (structure.py: JSON and safetensors headers only), since
whoever can write a checkpoint can recompute its manifest. On a local disk the
blocks of a file are hashed in parallel straight from the file (integrity.py,
disk speed); on an object store every file is streamed once through the block
hasher, and `fetch` writes the stream into a local copy as it goes, so a
checkpoint downloaded for export is verified without a second read.

Credentials come only from the environment, through the storage library's own
chain (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance
roles); nothing here accepts or prints them. Throttling (503 SlowDown) costs time,
not the run: requests and whole file reads are retried with backoff, counted
and logged (data/object_store.py). The endpoint of an S3-compatible
store comes from `endpoint_url`, else AWS_ENDPOINT_URL_S3, else
AWS_ENDPOINT_URL. Listings are never cached: a checkpoint committed since the
last call must show.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec

from data.object_store import open_fs, retrying
from jobconfig.errors import ConfigError
from pretrain.checkpoint import schema
from pretrain.checkpoint.integrity import (
    BLOCK,
    MANIFEST,
    BlockHasher,
    CheckpointError,
    block_kind,
    check_file,
    manifest_problem,
    matches,
)
from pretrain.checkpoint.schema import RNG_FILE, TRAINER_STATE  # noqa: F401 - where the other modules find them
from pretrain.checkpoint.structure import checkpoint_problems

LATEST = "latest"
CHECKPOINTS_DIR = "checkpoints"  # a run's checkpoint root, in its out_dir
CHUNK = 1 << 22


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_remote(root: str | Path) -> bool:
    root = str(root)
    return "://" in root and not root.startswith("file://")


def store_options(url: str, endpoint_url: str | None = None) -> dict:
    """What a checkpoint store adds to `url`'s fsspec options: the endpoint and no listing cache (never
    credentials); data/object_store.py adds the retries."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict = {"use_listings_cache": False, "skip_instance_cache": True}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


@dataclass(frozen=True)
class Skipped:
    """A checkpoint `choose` passed over, and why."""
    tag: str
    problems: tuple[str, ...]
    url: str  # how messages name it

    def __str__(self) -> str:
        return f"{self.url}: " + "; ".join(self.problems)


@dataclass(frozen=True)
class Choice:
    """What `CheckpointStore.choose` picked: `tag`, None when no checkpoint verifies (every one is then
    in `skipped`) or there is none; `skipped`, the newer ones passed over, newest first."""
    tag: str | None
    skipped: tuple[Skipped, ...]
    root: str  # the checkpoint root, as messages name it

    def required(self) -> str:
        """The tag; for a caller that cannot go on without one, the reason there is none as the error."""
        if self.tag is not None:
            return self.tag
        if not self.skipped:
            raise ConfigError(f"no checkpoints (step_* folders) under {self.root}")
        raise CheckpointError(f"no checkpoint under {self.root} verifies: " + " | ".join(map(str, self.skipped)))


class CheckpointStore:
    """The checkpoint root at `root` (a local path or an fsspec URL)."""

    def __init__(self, root: str | Path, endpoint_url: str | None = None):
        url = str(root)
        self.remote = is_remote(url)
        self.protocol = url.split("://", 1)[0] if self.remote else "file"
        if self.remote:  # throttling is retried with backoff, counted and logged (data/object_store.py)
            self.fs, self.root = open_fs(url, store_options(url, endpoint_url))
        else:
            self.fs, self.root = fsspec.filesystem("file"), str(Path(url.removeprefix("file://")))

    @classmethod
    def of_run(cls, path: str | Path, endpoint_url: str | None = None) -> "CheckpointStore":
        """A run's out_dir (whose checkpoints/ folder is the root) or a checkpoint root itself."""
        store = cls(path, endpoint_url)
        inner = cls(f"{str(path).rstrip('/')}/{CHECKPOINTS_DIR}", endpoint_url)
        return inner if inner.exists() else store

    # ------------------------------------------------------------ names
    def url(self, *parts: str) -> str:
        """How messages name a file: the plain path locally, the full URL on an object store."""
        path = "/".join([self.root, *parts])
        return f"{self.protocol}://{path}" if self.remote else path

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def local_dir(self, tag: str) -> Path:
        if self.remote:
            raise ValueError(f"{self.url(tag)} is on an object store; fetch() it first")
        return Path(self.root) / tag

    # ------------------------------------------------------------ listing
    def exists(self) -> bool:
        return self.fs.isdir(self.root)

    def tags(self) -> list[str]:
        """Checkpoint directories, oldest first (pruned or temporary ones are not `step_*`)."""
        if not self.exists():
            return []
        entries = self.fs.ls(self.root, detail=True)
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if n.startswith("step_"))

    def latest(self) -> str | None:
        """The tag `latest` names (only shown and compared with tags: bytes that are no text do no harm)."""
        try:
            return self.fs.cat_file(self._path(LATEST))[:256].decode(errors="replace").strip()
        except FileNotFoundError:
            return None

    def read_json(self, *parts: str):
        """A JSON file of the store (None when missing); one that is not JSON is refused (RefusedFile)."""
        try:
            data = self.fs.cat_file(self._path(*parts))
        except FileNotFoundError:
            return None
        return schema.parse_json(data, self.url(*parts))

    def trainer_state(self, tag: str, resumable: bool = False) -> dict:
        """trainer_state.json of checkpoint `tag` ({} when it holds none), refused (RefusedFile, naming the
        field) when it does not follow its schema; `resumable`: refused too without what a resume or a
        conversion reads (step, config.model, loader state)."""
        where = self.url(tag, TRAINER_STATE)
        state = self.read_json(tag, TRAINER_STATE)
        if state is None and resumable:  # the manifest vouches for what is there: no retry brings it back
            raise schema.RefusedFile(f"{where}: missing (not a checkpoint this trainer wrote)")
        return {} if state is None else schema.trainer_state(state, where, resumable)

    def files(self, tag: str) -> dict[str, int]:
        """Every file of checkpoint `tag` and its size, from one listing (no request per file)."""
        base = self.fs._strip_protocol(self._path(tag)).rstrip("/") + "/"
        return {name[len(base):]: info["size"] for name, info in self.fs.find(self._path(tag), detail=True).items()
                if name.startswith(base)}

    def size(self, tag: str, files: dict[str, int] | None = None) -> int:
        return sum((self.files(tag) if files is None else files).values())

    def is_complete(self, tag: str) -> bool:
        """Committed: its manifest exists (`verify` says whether the files still match it)."""
        return self.fs.exists(self._path(tag, MANIFEST))

    # ------------------------------------------------------------ verification
    def manifest(self, tag: str) -> tuple[dict | None, list[str]]:
        """(manifest, []) or (None, [the problem])."""
        try:
            manifest = self.read_json(tag, MANIFEST)
        except CheckpointError as e:  # not JSON, or nested past the parser
            return None, [str(e)]
        if manifest is None:
            return None, [f"{self.url(tag, MANIFEST)}: missing (save did not finish)"]
        if isinstance(manifest, dict) and (problem := manifest_problem(manifest, self.url(tag, MANIFEST))):
            return None, [problem]
        try:  # checksums match: still, every entry must be a file inside the checkpoint with sizes and digests
            schema.manifest(manifest, self.url(tag, MANIFEST))
        except CheckpointError as e:
            return None, [str(e)]
        return manifest, []

    def verify(self, tag: str, full: bool = True, share: tuple[int, int] = (0, 1),
               files: dict[str, int] | None = None) -> list[str]:
        """Problems with one checkpoint ([] when complete). `full` re-hashes every file (else sizes
        only); `share=(i, n)` checks only every n-th file from the i-th (ranks split the work). Sizes
        come from one listing of the checkpoint (`files`, if the caller has it), not a request per file."""
        manifest, problems = self.manifest(tag)
        if manifest is None:
            return problems
        if files is None and (self.remote or not full):  # a local full check reads each file anyway
            files = self.files(tag)
        for i, (rel, info) in enumerate(manifest["files"].items()):
            if i % share[1] != share[0]:
                continue
            if problem := self._retrying(lambda rel=rel, info=info: self._check(tag, rel, info, full, listed=files),
                                         tag, rel):
                problems.append(problem)
        if full and not problems and not self.remote and share[0] == 0:  # one rank reads the headers
            problems += checkpoint_problems(Path(self.root) / tag, manifest["files"])
        return problems

    def _retrying(self, fn, *parts: str):
        """An object-store read retried whole past a throttling burst (a local one runs once)."""
        return retrying(fn, self.url(*parts)) if self.remote else fn()

    def _check(self, tag: str, rel: str, info: dict, full: bool = True, sink=None,
               listed: dict[str, int] | None = None) -> str | None:
        """One file against its manifest entry (streamed into `sink` if given); a problem line, or None.
        `listed`: the checkpoint's files and sizes from one listing (else the store is asked for this one)."""
        url = self.url(tag, rel)
        if not self.remote and sink is None and full:
            return check_file(Path(url), info)  # parallel block hashing straight from the disk
        if listed is not None:
            size = listed.get(rel)
        else:
            try:
                size = self.fs.size(self._path(tag, rel))
            except FileNotFoundError:
                size = None
        if size is None:
            return f"{url}: missing"
        if size != info["bytes"]:
            return f"{url}: {size} bytes, manifest says {info['bytes']}"
        if not full:
            return None
        kind = block_kind(info)
        blocks = BlockHasher(info.get("block_bytes", BLOCK), kind) if kind else None
        whole = hashlib.sha256()  # manifests written before block hashes
        with self.fs.open(self._path(tag, rel), "rb", block_size=CHUNK) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                (blocks or whole).update(chunk)
                if sink is not None:
                    sink.write(chunk)
        digest = blocks.digest() if blocks else whole.hexdigest()
        return None if matches(info, digest) else f"{url}: checksum mismatch"

    def choose(self, step: int | None = None, full: bool = True,
               problems: Callable[[str], list[str]] | None = None) -> Choice:
        """The one rule every reader of a checkpoint root follows (the Trainer's resume, `vgpt ckpt`):
        without `step` the newest checkpoint that verifies, with every newer one skipped and why (no
        tag when none verifies, or there are none: `Choice.required` refuses that); with `step` that
        checkpoint, refused when it is not there (ConfigError) or does not verify (CheckpointError).
        `problems(tag)` replaces `verify(tag, full)` (the manager splits it over the ranks)."""
        tags = self.tags()
        check = problems or (lambda t: self.verify(t, full=full))
        if step is not None:
            tag = tag_for(step)
            if tag not in tags:
                if not tags:
                    raise ConfigError(f"no checkpoints (step_* folders) under {self.url()}")
                steps = ", ".join(str(int(t.split("_")[1])) for t in tags)
                raise ConfigError(f"no checkpoint for step {step} under {self.url()} (steps: {steps})")
            if found := check(tag):
                raise CheckpointError(f"{self.url(tag)} is broken: " + "; ".join(found))
            return Choice(tag, (), self.url())
        skipped = []
        for tag in reversed(tags):
            found = check(tag)
            if not found:
                return Choice(tag, tuple(skipped), self.url())
            skipped.append(Skipped(tag, tuple(found), self.url(tag)))
        return Choice(None, tuple(skipped), self.url())

    def fetch(self, tag: str, dest: Path) -> list[str]:
        """Copy checkpoint `tag` into the local directory `dest`, hashing every file on the way; the
        problems found ([] = `dest` is a verified copy, manifest included)."""
        manifest, problems = self.manifest(tag)
        if manifest is None:
            return problems
        dest.mkdir(parents=True, exist_ok=True)
        files = self.files(tag)
        for rel, info in manifest["files"].items():
            target = dest / rel
            if dest.resolve() not in target.resolve().parents:
                problems.append(f"{self.url(tag, MANIFEST)}: file name {rel!r} points outside the checkpoint")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)

            def copy_one(rel=rel, info=info, target=target):
                with open(target, "wb") as sink:  # a retry starts the file afresh
                    return self._check(tag, rel, info, sink=sink, listed=files)
            if problem := self._retrying(copy_one, tag, rel):
                problems.append(problem)
        (dest / MANIFEST).write_text(json.dumps(manifest))
        return problems or checkpoint_problems(dest, manifest["files"])


def read_trainer_state(ckpt: str | Path, resumable: bool = False) -> dict:
    """The trainer state a local checkpoint directory records ({} when it holds none), checked against its
    schema (`CheckpointStore.trainer_state`)."""
    ckpt = Path(ckpt)
    return CheckpointStore(ckpt.parent).trainer_state(ckpt.name, resumable)


def verify_checkpoint(ckpt: str | Path, full: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
    """`CheckpointStore.verify` for one local checkpoint directory."""
    ckpt = Path(ckpt)
    return CheckpointStore(ckpt.parent).verify(ckpt.name, full=full, share=share)
