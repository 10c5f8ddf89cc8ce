"""SIGKILL during background checkpoint saves, many times, in one process (tests/test_async_checkpoint.py).

    python tests/async_kill_harness.py WORKDIR TRIALS SEED

One debug-model Trainer (real DeepSpeed engine, world size 1) trains an
uninterrupted run and records its losses. Then, per trial, the state at step 4
is restored, a child is forked that starts the real background save of step 4
and SIGKILLs itself at one point of it: at the k-th write of a file (any file,
any slice), just before the manifest (rank 0's commit), between the commit's
two writes (the manifest and `latest`), or after the commit.
The parent then does what a restarted run does: `Trainer.resume("auto")`
(the resume plan: the one checkpoint-choice rule over the root, every file
re-hashed, the chosen checkpoint loaded), one training step, and compares
that step's loss with the uninterrupted run's loss at the same step. Forking
keeps twenty kills to seconds (no interpreter start, no engine build per
kill). Prints one JSON line per trial.

How the child ended is recorded, not assumed: it writes the point it is
about to die at into a marker file and then SIGKILLs itself; a save that
finishes without reaching its point exits with NOT_REACHED instead. One more
run, the control, asks for a point past the last write: its child must
report that it was never killed (the harness can tell a kill from none).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # no OpenMP pool to inherit across fork
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jobconfig.loader import load_config  # noqa: E402
from pretrain.checkpoint import manager  # noqa: E402
from pretrain.checkpoint.storage import CheckpointStore, tag_for  # noqa: E402
from pretrain.training.trainer import Trainer  # noqa: E402
from tests.forked_kill import kill_self, run_until_killed  # noqa: E402

BASE_STEP, SAVE_STEP, LAST_STEP = 2, 4, 5


def losses_of(trainer: Trainer, upto: int) -> dict[int, float]:
    out = {}
    while trainer.step < upto:
        record = trainer.train_step()
        out[record["step"]] = float(record["loss"])
    return out


def save_and_die(trainer: Trainer, point, marker: Path) -> None:
    """In the forked child: the background save of SAVE_STEP, SIGKILLed at `point` after writing it to
    `marker`; returns when the save finishes first (the child then exits NOT_REACHED)."""
    def die() -> None:
        kill_self(marker, point)
    count = [0]

    def on_write(n: int) -> None:
        count[0] += 1
        if count[0] == point:
            die()
    trainer.ckpt.on_write = on_write
    if point == "before_commit":
        trainer.ckpt.before_commit = lambda step: die()
    if point == "mid_commit":  # the commit is two writes, the manifest and `latest`: dies after the first
        for name in ("write_manifest", "write_latest"):
            real = getattr(manager, name)
            setattr(manager, name, lambda *args, real=real: (real(*args), die()))
    trainer.ckpt.save(trainer.engine, SAVE_STEP, trainer.trainer_state(), model=trainer.model, background=True)
    trainer.ckpt.wait()
    if point == "committed":
        die()  # a point past the last write returns: the save finished, nothing killed it


def kill_and_restart(trainer: Trainer, root: Path, golden: Path, point, work: Path) -> dict:
    """Start the background save of SAVE_STEP in a forked child that dies at `point`; then restart as a
    run does (`Trainer.resume("auto")`) and train one step. What happened, as a dict."""
    shutil.rmtree(root)
    shutil.copytree(golden, root, ignore=shutil.ignore_patterns(tag_for(SAVE_STEP)))
    (root / "latest").write_text(tag_for(BASE_STEP))
    trainer.resume(str(golden / tag_for(SAVE_STEP)))
    marker = work / "killed_at"
    marker.unlink(missing_ok=True)
    killed, ended = run_until_killed(lambda: save_and_die(trainer, point, marker))
    killed_at = marker.read_text() if marker.exists() else None
    latest = CheckpointStore(root).latest()  # as the killed save left it
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        plan = trainer.resume("auto")  # what a restarted run does
    record = trainer.train_step()
    return {"point": point, "ended": ended, "killed_at": killed_at,
            "killed": killed and killed_at == str(point),
            "chosen": plan.checkpoint.name if plan.checkpoint else None, "skipped": [str(s) for s in plan.skipped],
            "warned": [str(w.message) for w in warned if str(w.message).startswith("checkpoint ")], "latest": latest,
            "latest_complete": latest is not None and not CheckpointStore(root).verify(latest),
            "step": record["step"], "loss": float(record["loss"])}


def main() -> int:
    work, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/debug.yaml", [
        "--parallel.device=cpu", "--parallel.precision=fp32", "--model.attention=blockwise",
        f"--train.steps={LAST_STEP}", "--train.tensorboard=false", "--train.async_checkpoint=true",
        f"--train.out_dir={work / 'run'}", "--train.keep_last=0"])
    trainer = Trainer(cfg)
    golden = work / "golden"  # committed copies of the states at BASE_STEP and SAVE_STEP
    reference = losses_of(trainer, BASE_STEP)
    trainer.ckpt.save(trainer.engine, trainer.step, trainer.trainer_state(), model=trainer.model)
    reference.update(losses_of(trainer, SAVE_STEP))
    trainer.ckpt.save(trainer.engine, trainer.step, trainer.trainer_state(), model=trainer.model)
    reference.update(losses_of(trainer, LAST_STEP))
    root = trainer.ckpt.root
    shutil.copytree(root, golden)
    writes = [0]  # how many writes one save of SAVE_STEP makes: the kill points to choose from
    trainer.resume(str(golden / tag_for(SAVE_STEP)))
    shutil.rmtree(root / tag_for(SAVE_STEP))
    trainer.ckpt.on_write = lambda n: writes.__setitem__(0, writes[0] + 1)
    trainer.ckpt.save(trainer.engine, SAVE_STEP, trainer.trainer_state(), model=trainer.model)
    trainer.ckpt.on_write = None
    # kill points: the first and last write, just before the commit, after it; the rest at random writes
    rng = random.Random(seed)
    points = [1, writes[0], "before_commit", "committed"]
    points += [rng.randint(1, writes[0]) for _ in range(max(0, trials - len(points)))]
    print(json.dumps({"writes_per_save": writes[0], "reference": reference}), flush=True)
    for trial, point in enumerate(points[:trials]):
        t = kill_and_restart(trainer, root, golden, point, work)
        print(json.dumps({"trial": trial, **t, "reference": reference[t["step"]]}), flush=True)
    # between the commit's two writes: `latest` must still name a complete checkpoint
    t = kill_and_restart(trainer, root, golden, "mid_commit", work)
    print(json.dumps({"mid_commit": {**t, "reference": reference[t["step"]]}}), flush=True)
    control = kill_and_restart(trainer, root, golden, writes[0] + 1, work)  # past the last write: never reached
    print(json.dumps({"control": {**control, "reference": reference[control["step"]]}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
