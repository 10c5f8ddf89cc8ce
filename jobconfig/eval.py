"""`eval:` section: held-out evaluation during training (pretrain/evaluation/latent_eval.py).

Held-out samples come from a deterministic split of the training dataset by key hash
(`heldout_fraction`: a sample's membership depends on its key alone, so the split is stable
as the dataset grows, and the training loader never serves a held-out sample), or from a
separate dataset (`root`), which then leaves training untouched. The loss is the next-clip
loss at fixed noise levels (`t_values`) with fixed noise and clip partitions, so curves are
comparable across runs, stages and world sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from jobconfig.errors import ConfigError


@dataclass
class EvalConfig:
    """Held-out evaluation: where its samples come from, how often it runs, at which noise levels."""
    every: int = 0  # evaluate every this many steps (and at the end of the stage); 0 = off
    # fraction of the training dataset held out by key hash (never trained on); 0 = no split
    heldout_fraction: float = 0.0
    heldout_max: int = 64  # held-out samples evaluated (the lowest key hashes), at most (synthetic data: videos)
    # a separate held-out dataset (a precomputed latent root); then nothing is split off the training data
    root: Optional[str] = None
    # noise levels t of the loss (t = 1 is clean data); one curve per t and their mean
    t_values: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    seed: int = 0  # seed of the held-out noise and clip partitions (never a training RNG stream)
    # predict the last clip of a few held-out videos every this many steps (KV-cache sampler; a strip PNG under
    # <out_dir>/predictions/ and an image in TensorBoard, PSNR/SSIM against truth and repeating the last frame);
    # 0 = off. Needs the dataset's VAE (its plan.json) and every weight on one rank (ZeRO <= 2, no TP/SP)
    predict_every: int = 0
    predict_samples: int = 2  # held-out videos predicted
    predict_steps: int = 8    # Euler steps of the prediction (vgpt predict's default is 50)

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"every: got {self.every}, expected >= 0 (0 = off)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction: got {self.heldout_fraction}, expected a value in [0, 1) "
                              "(0 = no split)")
        if self.heldout_max <= 0:
            raise ConfigError(f"heldout_max: got {self.heldout_max}, expected a positive integer")
        if self.root is not None and self.heldout_fraction:
            raise ConfigError(f"heldout_fraction: got {self.heldout_fraction} with root={self.root!r}, expected "
                              "one source of held-out samples: a split of the training data or a separate root")
        if not self.t_values or any(not 0.0 <= t < 1.0 for t in self.t_values):
            raise ConfigError(f"t_values: got {self.t_values}, expected a non-empty list of noise levels in [0, 1) "
                              "(t = 1 is clean data, whose loss says nothing)")
        for name in ("predict_every",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 0 (0 = off)")
        for name in ("predict_samples", "predict_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if len(set(self.t_values)) != len(self.t_values):
            raise ConfigError(f"t_values: got {self.t_values}, expected distinct values")

    @property
    def split_fraction(self) -> float:
        """The fraction the training loader leaves out (0 with a separate root or no split)."""
        return 0.0 if self.root else self.heldout_fraction

    def check_predict(self, train_data: str, zero_stage: int, tensor_parallel: int, sequence_parallel: int) -> None:
        """Prediction during training runs the plain model on rank 0 and decodes with the dataset's VAE."""
        if not self.predict_every:
            return
        if train_data != "latents":
            raise ConfigError(f"predict_every: got {self.predict_every} with train.data={train_data!r}; predictions "
                              "are decoded with the latent dataset's VAE (train.data=latents)")
        if zero_stage >= 3 or tensor_parallel > 1 or sequence_parallel > 1:
            raise ConfigError(f"predict_every: got {self.predict_every} with ZeRO-{zero_stage}, tensor_parallel="
                              f"{tensor_parallel}, sequence_parallel={sequence_parallel}; prediction during training "
                              "needs every weight on one rank (ZeRO <= 2, no TP/SP): set eval.predict_every=0 and "
                              "run vgpt predict on the stage's export")
        if not self.every:
            raise ConfigError(f"predict_every: got {self.predict_every} with eval.every=0; it predicts held-out "
                              "samples of the evaluation: set eval.every too")

    def check_source(self, train_data: str) -> None:
        """Evaluation during training needs held-out samples: a split or root of latents, or the
        synthetic held-out set when training on synthetic data."""
        if self.every and train_data == "latents" and not (self.root or self.heldout_fraction):
            raise ConfigError("every: evaluation is on (eval.every="
                              f"{self.every}) but there are no held-out samples; set eval.heldout_fraction "
                              "(e.g. 0.01) or eval.root (a separate precomputed dataset)")
