"""SIGKILL during background checkpoint saves, many times, in one process (tests/test_async_checkpoint.py).

    python tests/async_kill_harness.py WORKDIR TRIALS SEED

One debug-model Trainer (real DeepSpeed engine, world size 1) trains an
uninterrupted run and records its losses. Then, per trial, the state at step 4
is restored, a child is forked that starts the real background save of step 4
and SIGKILLs itself at one point of it: at the k-th write of a file (any file,
any slice), just before the manifest (rank 0's commit), or after the commit.
The parent then does what a restarted run does: the one checkpoint-choice rule
(`CheckpointStore.choose`) over the root, `Trainer.resume` from what it
picked, one training step, and compares that step's loss with the
uninterrupted run's loss at the same step. Forking keeps twenty kills to
seconds (no interpreter start, no engine build per kill). Prints one JSON
line per trial.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # no OpenMP pool to inherit across fork
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jobconfig.loader import load_config  # noqa: E402
from pretrain.checkpoint.storage import CheckpointStore, tag_for  # noqa: E402
from pretrain.training.trainer import Trainer  # noqa: E402

BASE_STEP, SAVE_STEP, LAST_STEP = 2, 4, 5


def losses_of(trainer: Trainer, upto: int) -> dict[int, float]:
    out = {}
    while trainer.step < upto:
        record = trainer.train_step()
        out[record["step"]] = float(record["loss"])
    return out


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
        shutil.rmtree(root)
        shutil.copytree(golden, root, ignore=shutil.ignore_patterns(tag_for(SAVE_STEP)))
        (root / "latest").write_text(tag_for(BASE_STEP))
        trainer.resume(str(golden / tag_for(SAVE_STEP)))
        pid = os.fork()
        if pid == 0:  # the child: the real background save, killed at `point`
            count = [0]

            def on_write(n: int) -> None:
                count[0] += 1
                if count[0] == point:
                    os.kill(os.getpid(), signal.SIGKILL)
            trainer.ckpt.on_write = on_write
            if point == "before_commit":
                trainer.ckpt.before_commit = lambda step: os.kill(os.getpid(), signal.SIGKILL)
            trainer.ckpt.save(trainer.engine, SAVE_STEP, trainer.trainer_state(), model=trainer.model,
                              background=True)
            trainer.ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)  # "committed", or a point past the last write
        _, status = os.waitpid(pid, 0)
        store = CheckpointStore(root)
        tag, skipped = store.choose()
        trainer.resume(str(root / tag))
        record = trainer.train_step()
        step, loss = record["step"], float(record["loss"])
        print(json.dumps({"trial": trial, "point": point, "killed": os.WIFSIGNALED(status)
                          and os.WTERMSIG(status) == signal.SIGKILL, "chosen": tag, "skipped": skipped,
                          "latest": store.latest(), "step": step, "loss": loss,
                          "reference": reference[step]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
