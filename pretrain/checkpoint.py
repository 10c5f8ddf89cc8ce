"""One checkpoint manager for everything resumable.

Layout under the run's checkpoint root:

    step_00000020/            DeepSpeed engine state (model, optimizer, scheduler; ZeRO shards)
    step_00000020/trainer_state.json   stage, step, consumed samples, loader state, config
    step_00000020/rng.safetensors      torch CPU RNG state (no pickle)
    step_00000020/manifest.json        size + sha256 of every file above, written last
    latest                     the tag of the newest complete checkpoint, moved after the manifest

A checkpoint is complete when its manifest exists and every file matches it.
The engine's own `latest` file is not written (we move ours last), so a save
killed half-way never becomes the one `--resume auto` picks. Loading refuses a
checkpoint with a missing or corrupt file, names it, and falls back to the
next older complete one, loudly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
RNG_FILE = "rng.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(ckpt_dir: Path, full: bool = True) -> list[str]:
    """Problems with one checkpoint directory ([] when complete). `full` re-hashes every file."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (save did not finish)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{manifest_path}: unreadable ({e})"]
    problems = []
    for rel, info in manifest["files"].items():
        p = ckpt_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']}")
        elif full and _sha256(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch")
    return problems


class CheckpointManager:
    def __init__(self, root: str | Path, rank: int = 0, keep_last: int = 3, keep_every: int = 0):
        self.root = Path(root)
        self.rank = rank
        self.keep_last, self.keep_every = keep_last, keep_every

    # ------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict[str, Any], barrier=None) -> Path:
        """Collective: every rank calls it. Rank 0 writes the manifest and moves `latest`."""
        tag = tag_for(step)
        ckpt = self.root / tag
        if self.rank == 0 and ckpt.exists():
            shutil.rmtree(ckpt)  # an incomplete leftover of a killed save of this same step
        if barrier:
            barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        if self.rank == 0:
            save_file({"cpu": torch.get_rng_state()}, str(ckpt / RNG_FILE))
            _atomic_write(ckpt / TRAINER_STATE, json.dumps({**trainer_state, "step": step}, indent=1))
        if barrier:
            barrier()  # every rank's shards are on disk before the manifest vouches for them
        if self.rank == 0:
            self._crash_point("before_manifest", step)
            files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
            _atomic_write(ckpt / MANIFEST, json.dumps({"tag": tag, "step": step, "files": files}, indent=1))
            _atomic_write(self.root / "latest", tag)
            self.prune()
        if barrier:
            barrier()
        return ckpt

    @staticmethod
    def _crash_point(where: str, step: int) -> None:
        """Fault injection for tests: VGPT_FAULT_CKPT=before_manifest:STEP kills the process there."""
        if os.environ.get("VGPT_FAULT_CKPT") == f"{where}:{step}":
            os._exit(17)

    # ------------------------------------------------------------ find / load
    def tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def newest_complete(self, full_verify: bool = True) -> Path | None:
        """Newest checkpoint that verifies; warns about every newer one it had to skip."""
        for tag in reversed(self.tags()):
            problems = verify(self.root / tag, full=full_verify)
            if not problems:
                return self.root / tag
            warnings.warn(f"checkpoint {self.root / tag} is not usable, falling back to an older one: "
                          + "; ".join(problems), stacklevel=2)
        return None

    def load(self, engine, ckpt: Path) -> dict[str, Any]:
        """Restore engine and RNG from a verified checkpoint; return the trainer state."""
        load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        torch.set_rng_state(load_file(str(ckpt / RNG_FILE))["cpu"])
        return json.loads((ckpt / TRAINER_STATE).read_text())

    # ------------------------------------------------------------ retention
    def prune(self) -> list[str]:
        """Keep the newest `keep_last` complete checkpoints and every `keep_every`-th step."""
        if self.keep_last <= 0:
            return []
        complete = [t for t in self.tags() if (self.root / t / MANIFEST).is_file()]
        keep = set(complete[-self.keep_last:])
        if self.keep_every:
            keep |= {t for t in complete if int(t.split("_")[1]) % self.keep_every == 0}
        removed = [t for t in complete if t not in keep]
        for t in removed:
            shutil.rmtree(self.root / t, ignore_errors=True)
        return removed
