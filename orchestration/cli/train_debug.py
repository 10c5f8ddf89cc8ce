"""`vgpt train-debug` (deprecated): `vgpt train --config configs/debug.yaml` in one process.

Kept so that old scripts work: it runs the one Trainer on synthetic
moving-square latents (`train.data: synthetic`) in fp32 without ZeRO, as the
old single-process loop did, prints progress in that loop's format and writes
its files: `losses.json` (the loss of every step) and `loss.png`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from jobconfig.job import JobConfig
from jobconfig.loader import CONFIG_ROOT, load_config
from orchestration.cli import reports_bad_input, verb_parser
from orchestration.faults import trainer_hooks
from parallel.device import destroy_process_group
from pretrain.evaluation.figures import plot_loss_curves
from pretrain.training.trainer import Trainer

# what the old loop was: one process, plain fp32 AdamW; the config and the command line may still override
ONE_PROCESS_FP32 = ["--parallel.precision=fp32", "--parallel.zero_stage=0"]


class _DebugTrainer(Trainer):
    def progress_line(self, m: dict, mfu: str, eta: float) -> str:  # the old loop's console format
        return (f"step {m['step']:5d}/{self.cfg.train.steps}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  "
                f"lr {m['lr']:.2e}  {m['samples_per_s']:.1f} samples/s  ETA {eta:.0f}s")


@reports_bad_input("train-debug")
def main(argv: list[str]) -> int:
    parser = verb_parser("train-debug", __doc__, JobConfig)
    parser.add_argument("--config", default=None, help="job YAML (default: configs/debug.yaml)")
    args, overrides = parser.parse_known_args(argv)
    print("vgpt train-debug is deprecated: it is `vgpt train --config configs/debug.yaml` "
          f"{' '.join(ONE_PROCESS_FP32)}", file=sys.stderr, flush=True)
    cfg = load_config(args.config or CONFIG_ROOT / "debug.yaml", [*ONE_PROCESS_FP32, *overrides])
    try:
        with _DebugTrainer(cfg, stage_name="debug", hooks=trainer_hooks()) as trainer:
            trainer.run(resume="fresh")  # a rerun replaces the previous debug run (moved aside, not deleted)
    finally:
        destroy_process_group()
    losses = [m["loss"] for m in trainer.metrics.history]
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(json.dumps(losses))
    plot_loss_curves({"debug": dict(enumerate(losses, start=1))}, out / "loss.png")
    first = sum(losses[:10]) / min(10, len(losses))
    last = sum(losses[-10:]) / min(10, len(losses))
    print(f"loss {first:.4f} -> {last:.4f} ({first / max(last, 1e-12):.1f}x lower); curve in {out}/loss.png")
    return 0
