"""SIGKILL during a resume on another layout, at several points of its reads, in one process
(tests/test_checkpoint_layout.py).

    python tests/reshard_kill_harness.py RUN_DIR ROWS STEPS

RUN_DIR holds one checkpoint written by 2 ranks under ZeRO-2 (a copy of the
shared run's). One debug-model Trainer of 1 rank x ROWS rows resumes from it
once, counting the ranged reads of the resharded load
(`CheckpointManager.on_read`); then, per kill point (the first read, one in the
middle, the last), a forked child resumes and SIGKILLs itself at that read,
after writing the point into a marker file. The parent then does what a
restarted run does, `Trainer.resume("auto")` (every file re-hashed, the
checkpoint chosen and loaded) and trains STEPS steps. Forking keeps
each kill to milliseconds (no interpreter start, no engine build).
Prints one JSON line: the reads of one load, each kill as the child ended, and
the losses of the steps after the resume.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # no OpenMP pool to inherit across fork
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jobconfig.loader import load_config  # noqa: E402
from pretrain.training.trainer import Trainer  # noqa: E402
from tests.forked_kill import kill_self, run_until_killed  # noqa: E402



def resume_and_die(trainer: Trainer, point: int, marker: Path) -> None:
    def on_read(n: int) -> None:
        if n == point:
            kill_self(marker, point)
    trainer.ckpt.on_read = on_read
    trainer.resume("auto")


def main() -> int:
    run, rows, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/debug.yaml", [
        "--parallel.device=cpu", "--parallel.precision=fp32", "--model.attention=blockwise", "--synthetic.frames=6",
        "--train.steps=100", f"--train.batch_size={rows}", "--parallel.zero_stage=2", "--train.tensorboard=false",
        f"--train.out_dir={run}"])
    trainer = Trainer(cfg)
    reads = [0]
    trainer.ckpt.on_read = lambda n: reads.__setitem__(0, n)
    trainer.resume("auto")  # counts the reads of one resharded load
    trainer.ckpt.on_read = None
    kills = []
    for point in (1, reads[0] // 2, reads[0]):
        marker = run.parent / "killed_at"
        marker.unlink(missing_ok=True)
        killed, ended = run_until_killed(lambda: resume_and_die(trainer, point, marker))
        kills.append({"point": point, "ended": ended,
                      "killed": killed and marker.exists() and marker.read_text() == str(point)})
    plan = trainer.resume("auto")  # what a restarted run does
    records = [trainer.train_step() for _ in range(steps)]
    print(json.dumps({"reads": reads[0], "kills": kills, "chosen": plan.checkpoint.name if plan.checkpoint else None,
                      "losses": {r["step"]: float(r["loss"]) for r in records}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
