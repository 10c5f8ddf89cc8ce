"""The run directory and the resume policy: what starting a run in an out_dir will do.

`plan_resume(mode, out_dir)` decides, from the files alone and before any
process group, model or engine exists, what `--resume MODE` does there: resume
from which checkpoint (and which newer ones are skipped, and why), start at
step 0, set an earlier run aside first, or refuse with a `ResumeRefused` (a
ConfigError: one line, exit 2) and nothing changed. The preflight
(orchestration/preflight.py) calls it with a sizes-only check, so refusals
come before torchrun starts; the Trainer calls it again with every file
re-hashed by the ranks together, and executes the plan. The plan never
deletes a checkpoint; checkpoints are chosen by the one rule,
`CheckpointStore.choose`.

A run directory holds `checkpoints/`, `metrics.jsonl`, `tensorboard/` and
`export/` (RUN_ENTRIES): what `--resume fresh` moves aside, whole, into
`<out_dir>/replaced-<time>/`.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jobconfig.errors import ConfigError
from pretrain.checkpoint.export import export_path
from pretrain.checkpoint.integrity import CheckpointError
from pretrain.checkpoint.storage import CHECKPOINTS_DIR, CheckpointStore, Skipped, is_remote, verify_checkpoint
from pretrain.training.metric_sinks import METRICS_FILE, TENSORBOARD_DIR

RESUME_MODES = "auto (newest checkpoint that verifies) | none (fresh, into an out_dir without checkpoints) | " \
               "fresh (fresh; an earlier run's checkpoints and metrics are moved aside first) | a checkpoint path"
NAMED_MODES = ("auto", "none", "fresh")  # the rest: a checkpoint directory
RUN_ENTRIES = (CHECKPOINTS_DIR, METRICS_FILE, TENSORBOARD_DIR, export_path("").name)


class ResumeRefused(CheckpointError, ConfigError):
    """Starting would lose (or silently redo) an earlier run; nothing was changed. A ConfigError, so the
    command line reports it as one line `vgpt train: ...` with exit status 2."""


@dataclass(frozen=True)
class ResumePlan:
    """What a run started with `--resume mode` in `out_dir` does. `checkpoint`: resume from it (None:
    start at step 0); `set_aside`: the earlier run's checkpoints, moved aside with its metrics first;
    `skipped`: checkpoints passed over, newest first; `leftover`: they are the remains of a save
    killed before any checkpoint was committed (nothing of a run to keep)."""
    mode: str
    out_dir: Path
    checkpoint: Path | None = None
    set_aside: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    leftover: bool = False

    @property
    def warnings(self) -> list[str]:
        """One line per checkpoint skipped, for the log and the warnings."""
        if self.leftover:
            head = "is the leftover of a save killed before any was committed, starting over: "
        else:
            head = "is not usable, falling back to an older one: "
        return [f"checkpoint {s.url} {head}" + "; ".join(s.problems) for s in self.skipped]


def plan_resume(mode: str, out_dir: str | Path, problems: Callable[[Path], list[str]] | None = None) -> ResumePlan:
    """The plan for `--resume mode` (RESUME_MODES) in `out_dir`; ResumeRefused when it must not start.
    `problems(checkpoint_dir)` verifies one checkpoint (default: every file re-hashed)."""
    out = Path(out_dir)
    root = out / CHECKPOINTS_DIR
    check = problems or verify_checkpoint
    if mode in ("none", "fresh"):
        tags = _earlier_run(root)
        if tags and mode == "none":
            raise ResumeRefused(f"--resume none: {root} already holds checkpoints ({span(tags)}) that a fresh "
                                "start would overwrite; nothing was changed. Resume them (--resume auto), give "
                                "another --train.out_dir, or --resume fresh to move them aside and start over")
        return ResumePlan(mode, out, set_aside=tuple(tags))
    if mode == "auto":
        choice = CheckpointStore(root).choose(problems=lambda tag: check(root / tag))
        if choice.tag is not None:
            return ResumePlan(mode, out, root / choice.tag, skipped=choice.skipped)
        if choice.skipped and _earlier_run(root):
            raise ResumeRefused(
                f"--resume auto: none of the {len(choice.skipped)} checkpoint(s) under {root} verifies, and "
                "starting over would overwrite them; nothing was changed. "
                + " | ".join(f"{s.tag}: {'; '.join(s.problems)}" for s in choice.skipped)
                + ". Repair or resume one (--resume PATH), or --resume fresh to move them aside and start over")
        return ResumePlan(mode, out, skipped=choice.skipped, leftover=bool(choice.skipped))
    if is_remote(mode):
        root, _, tag = mode.rstrip("/").rpartition("/")
        step = f" --step {int(tag[5:])}" if re.fullmatch(r"step_\d+", tag) else ""
        raise ResumeRefused(f"--resume: {mode} is on an object store; training resumes from a local checkpoint "
                            f"directory. Bring it here, verified as it is read and laid out for this run: `vgpt ckpt "
                            f"reshard {root if step else mode}{step} --dp <ranks> --out DIR`, then --resume "
                            f"DIR/{tag if step else 'step_<N>'}")
    ckpt = Path(mode)
    if not ckpt.exists():
        raise ResumeRefused(f"--resume: {mode} does not exist (expected auto, none, fresh or a checkpoint directory)")
    if not ckpt.is_dir():
        raise ResumeRefused(f"--resume: {mode} is a file, expected a checkpoint directory (e.g. <out_dir>/"
                            "checkpoints/step_000100)")
    try:
        found = check(ckpt)  # never unpickle unverified
    except Exception as e:  # noqa: BLE001 - anything unreadable is not a checkpoint
        found = [str(e)]
    if found:
        raise ResumeRefused(f"--resume: {mode} is not a complete checkpoint: {'; '.join(map(str, found))[:300]}")
    return ResumePlan(mode, out, ckpt)


def set_aside(out_dir: Path) -> Path:
    """Move an earlier run's RUN_ENTRIES out of the way, into a new `replaced-<time>/` (rank 0)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out_dir / f"replaced-{stamp}", 1
    while dest.exists():
        n += 1
        dest = out_dir / f"replaced-{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in RUN_ENTRIES:
        if (out_dir / name).exists():
            os.replace(out_dir / name, dest / name)
    return dest


def span(tags: tuple[str, ...] | list[str]) -> str:
    """How messages name a run's checkpoints: the one, or how many and the first and last."""
    return tags[0] if len(tags) == 1 else f"{len(tags)} checkpoints, {tags[0]}..{tags[-1]}"


def _earlier_run(root: Path) -> list[str]:
    """The checkpoints of a run that committed one under `root` (`latest` or a manifest exists); none
    when it holds nothing, or only the leftover of a first save killed before its commit."""
    store = CheckpointStore(root)
    tags = store.tags()
    return tags if store.latest() is not None or any(store.is_complete(t) for t in tags) else []
