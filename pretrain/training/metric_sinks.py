"""Where a run's flushed step records go, on rank 0: metrics.jsonl, TensorBoard, Weights & Biases.

metrics.jsonl is always written (one line per step: what `vgpt` reports,
the quickstart's loss curves and the sweep runner read). TensorBoard
(`train.tensorboard`) and W&B (`train.wandb: <project>`) are optional views of
the same scalars, keyed `<stage>/<name>` at the global step.

W&B: the run's id is derived from the out_dir and stage, so a resumed run
continues the same W&B run instead of starting a second one; the mode comes
from the environment (WANDB_MODE=offline on an air-gapped cluster, then
`wandb sync`), and so do credentials (WANDB_API_KEY): nothing here takes or
writes them. The config logged is the redacted one checkpoints record.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from jobconfig.train import TrainConfig

METRICS_FILE = "metrics.jsonl"  # in the run's out_dir; what readers of a run's metrics open
TENSORBOARD_DIR = "tensorboard"
SCALARS = ("loss", "tokens_per_s", "samples_per_s", "step_time", "grad_norm", "lr", "mfu", "eval_time_share")
HELDOUT = "heldout_"  # prefix of the held-out losses and prediction scores of evaluation steps (eval:)


def wandb_run_id(out: Path, stage: str) -> str:
    return hashlib.sha256(f"{Path(out).resolve()}:{stage}".encode()).hexdigest()[:16]


class MetricSinks:
    def __init__(self, out: Path, stage: str, tc: TrainConfig, run_config: dict[str, Any]):
        self.out, self.stage, self.tc, self.run_config = Path(out), stage, tc, run_config
        self._tb = None
        self._wandb = None

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append flushed records (python numbers) to every sink."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a") as f:
            for m in records:
                f.write(json.dumps({"stage": self.stage, **m}) + "\n")
        scalars = [(m["step"], {f"{self.stage}/{k}": m[k] for k in m if k in SCALARS or k.startswith(HELDOUT)})
                   for m in records]
        if self.tc.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter  # optional view: loaded only when used
                self._tb = SummaryWriter(str(self.out / TENSORBOARD_DIR))
            for step, values in scalars:
                for k, v in values.items():
                    self._tb.add_scalar(k, v, step)
        if self.tc.wandb:
            run = self._wandb_run()
            for step, values in scalars:
                run.log(values, step=step)

    def write_image(self, step: int, name: str, image) -> None:
        """A uint8 [H, W, 3] picture (a held-out prediction strip) to TensorBoard and W&B, as `<stage>/<name>`."""
        if self.tc.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter  # optional view: loaded only when used
                self._tb = SummaryWriter(str(self.out / TENSORBOARD_DIR))
            self._tb.add_image(f"{self.stage}/{name}", image, step, dataformats="HWC")
        if self.tc.wandb:
            import wandb  # present: _wandb_run checks
            self._wandb_run().log({f"{self.stage}/{name}": wandb.Image(image)}, step=step)

    def _wandb_run(self):
        if self._wandb is None:
            try:
                import wandb  # optional dependency: pip install wandb
            except ImportError:
                raise RuntimeError(f"train.wandb: {self.tc.wandb!r} asks for Weights & Biases logging, but the "
                                   "wandb package is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=self.tc.wandb, name=f"{self.out.name}-{self.stage}",
                                     id=wandb_run_id(self.out, self.stage), resume="allow", dir=str(self.out),
                                     config=self.run_config, reinit="create_new")
        return self._wandb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
