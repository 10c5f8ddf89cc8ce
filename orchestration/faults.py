"""Fault injection for the failure tests, in one place: every switch, what it does, where it fires.

The production code has no fault code of its own: it exposes hook points
(`TrainerHooks`, the checkpoint manager's `before_commit`, the precompute
committer's `after_commit` and the filesystem it publishes the index through,
the sweep driver's `after_record`) and the
commands that run it install these hooks. Each switch is an environment
variable, so it reaches torchrun workers and Ray workers:

  VGPT_FAULT_KILL=RANK:STEP            `vgpt train`: SIGKILL that rank after that step, in the
                                       first attempt only (elastic restarts then run through)
  VGPT_FAULT_RAISE=RANK:STEP           `vgpt train`: that rank raises RuntimeError after that step (torchrun's
                                       error file then names it: the @record of orchestration/cli/__main__.py)
  VGPT_FAULT_CKPT=before_manifest:STEP `vgpt train`: rank 0 exits (17) when the checkpoint of that
                                       step is written but its manifest is not
  VGPT_FAULT_KILL_AFTER_SHARDS=N       `vgpt precompute`: the driver exits (13) after N committed shards
  VGPT_FAULT_KILL_PUBLISHING=1         `vgpt precompute`: the driver exits (14) while publishing the index,
                                       when it writes index.json (after the columns file it points to)
  VGPT_FAULT_PAUSE_NODES_DECODED=K:<dir> `vgpt precompute`: once K nodes have each decoded a video, the
                                       driver writes <dir>/paused.json (work per node) and waits for <dir>/resume
  VGPT_FAULT_DECODE_EXIT=<dir>         `vgpt precompute`: the first decode task kills its worker
  VGPT_FAULT_ENCODER_EXIT=<dir>        `vgpt precompute`: the first encode call kills its actor
  VGPT_FAULT_ENCODER_START=<dir>       `vgpt precompute`: the first encoder actor fails to start (its
                                       constructor raises, as when its node cannot set up the job)
  VGPT_SWEEP_FAULT_EXIT_AFTER=K        `vgpt sweep run`: the driver exits (3) after recording K trials

The three `<dir>` switches fire once per marker directory (an O_EXCL file), so
Ray's retry of the killed work succeeds.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pretrain.training.hooks import TrainerHooks

if TYPE_CHECKING:  # the hooks' argument; importing the trainer here would load it into every precompute worker
    from pretrain.training.trainer import Trainer


def trainer_hooks() -> TrainerHooks:
    after_step = _kill_after_step() or _raise_after_step()
    return TrainerHooks(after_step=after_step, before_checkpoint_commit=_exit_before_manifest())


def _raise_after_step() -> Callable[[Trainer], None] | None:
    spec = os.environ.get("VGPT_FAULT_RAISE")
    if not spec:
        return None
    rank, step = (int(x) for x in spec.split(":"))

    def hook(trainer: Trainer) -> None:
        if trainer.dist.rank == rank and trainer.step == step:
            raise RuntimeError(f"VGPT_FAULT_RAISE: rank {rank} fails after step {step}")
    return hook


def _kill_after_step() -> Callable[[Trainer], None] | None:
    spec = os.environ.get("VGPT_FAULT_KILL")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank, step = (int(x) for x in spec.split(":"))

    def hook(trainer: Trainer) -> None:
        if trainer.dist.rank == rank and trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _exit_before_manifest() -> Callable[[int], None] | None:
    spec = os.environ.get("VGPT_FAULT_CKPT")
    if not spec:
        return None

    def hook(step: int) -> None:
        if spec == f"before_manifest:{step}":
            os._exit(17)
    return hook


def exit_after_commits() -> Callable[[int], None] | None:
    """The precompute driver's hook, called with the number of shards committed so far."""
    limit = int(os.environ.get("VGPT_FAULT_KILL_AFTER_SHARDS", "0") or 0)
    if not limit:
        return None

    def hook(count: int) -> None:
        if count >= limit:
            print(f"[precompute] FAULT INJECTION: exiting after {count} committed shard(s)", flush=True)
            os._exit(13)
    return hook


class _DiesAtIndexJson:
    """A filesystem that passes every call through to `fs`, but exits the process (14) at the first
    write of index.json (or of a temporary file named after it): the point between a new index
    version's columns file and the pointer that publishes it."""

    _WRITES = ("pipe_file", "pipe", "put_file", "open", "mv", "rename", "copy", "write_bytes", "write_text")

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in self._WRITES:
            return attr

        def call(*args, **kwargs):
            mode = kwargs.get("mode", args[1] if name == "open" and len(args) > 1 else "rb")
            targets = args[1:2] if name in ("mv", "rename", "copy", "put_file") else args[:1]
            if (name != "open" or "r" not in mode) and any("index.json" in str(t).rsplit("/", 1)[-1]
                                                           for t in targets):
                print("[precompute] FAULT INJECTION: exiting while publishing the index (before index.json)",
                      flush=True)
                os._exit(14)
            return attr(*args, **kwargs)
        return call


def kill_while_publishing(fs):
    """The filesystem the precompute driver publishes the index through: `fs` itself, or with
    VGPT_FAULT_KILL_PUBLISHING set, one that dies before index.json is written."""
    return _DiesAtIndexJson(fs) if os.environ.get("VGPT_FAULT_KILL_PUBLISHING") else fs


def pause_when_nodes_decoded() -> Callable[[dict], None] | None:
    """The precompute driver's pause point (a test kills a node meanwhile), called with the work done
    per node after each result: pauses once, when K nodes have decoded something."""
    spec = os.environ.get("VGPT_FAULT_PAUSE_NODES_DECODED")
    if not spec:
        return None
    nodes_needed, where = spec.split(":", 1)
    fired = []

    def hook(nodes: dict) -> None:
        if fired or sum(1 for r in nodes.values() if r["decoded"]) < int(nodes_needed):
            return
        fired.append(True)
        (Path(where) / "paused.json").write_text(json.dumps(nodes))
        print(f"[precompute] FAULT INJECTION: paused with {nodes_needed} nodes having decoded", flush=True)
        for _ in range(6000):  # bounded: a test that never resumes fails instead of hanging
            if (Path(where) / "resume").exists():
                return
            time.sleep(0.1)
    return hook


def _first_time(switch: str, marker: str) -> bool:
    """True where the switch is set and this is the first call for its marker directory (an O_EXCL file,
    so that exactly one process fires however many race)."""
    where = os.environ.get(switch)
    if not where:
        return False
    Path(where).mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(Path(where) / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def worker_dies_once(kind: str) -> None:
    """In a Ray decode task (`kind` 'decode') or encoder call ('encoder'): exit the worker process
    the first time, per marker directory."""
    if _first_time({"decode": "VGPT_FAULT_DECODE_EXIT", "encoder": "VGPT_FAULT_ENCODER_EXIT"}[kind], kind):
        os._exit(1)


def encoder_fails_to_start() -> None:
    """In an encoder actor's constructor: raise the first time, per marker directory. Ray does not
    restart an actor whose creation raised, so the driver must go on without it."""
    if _first_time("VGPT_FAULT_ENCODER_START", "encoder-start"):
        raise RuntimeError("FAULT INJECTION: this encoder fails to start")


def exit_after_records() -> Callable[[int], None] | None:
    """The sweep driver's hook, called with the number of trials recorded by this run."""
    limit = int(os.environ.get("VGPT_SWEEP_FAULT_EXIT_AFTER", "0"))
    if not limit:
        return None

    def hook(recorded: int) -> None:
        if recorded >= limit:
            os._exit(3)
    return hook
