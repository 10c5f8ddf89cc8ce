"""The typed config of `vgpt sweep`: which trials to run and how to judge them.

Loaded with `load_config(path, overrides, cls=SweepConfig)`. A trial is the base
job config (`base`, whose data and objective sections say which stage's data
and objective the sweep uses) plus `job_overrides`, plus the trial's own model
size, learning rate, batch size and step count (budget // batch). Grid errors
(an unknown size, a budget smaller than one batch) are ConfigErrors raised at
load time, before Ray or any trial starts.

What trials train on: `dataset`, a precomputed latent root (`vgpt precompute`),
sampled as the base config's `data.stage` says, and judged on that dataset's
held-out split (eval.heldout_fraction, by key hash: data/heldout_split.py); or,
with `dataset` empty, the base config's synthetic moving squares (the CPU
examples and the quickstart scale). A dataset URL that cannot name a dataset
(an unfilled placeholder such as s3://<your-bucket>/..., a malformed bucket) is
refused here, naming the key; one that names nothing readable is refused when
the trials are planned (orchestration/sweep/trial.py), before Ray starts.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from jobconfig.errors import ConfigError
from jobconfig.loader import model_presets


@dataclass
class SizeSpec:
    """One model size: a preset of the size registry (configs/model/) plus optional key overrides."""
    name: str = ""
    preset: str = ""  # empty: the size's name is the preset
    model: dict[str, Any] = field(default_factory=dict)  # e.g. {hidden_size: 32, num_layers: 1}
    # GPUs of one node each trial of this size trains on: one torchrun per trial, data parallel, the grid's
    # batch sizes split over them; 0: resources.num_gpus in one process
    gpus: int = 0

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("name: every size needs a name")
        if self.gpus < 0:
            raise ConfigError(f"gpus: got {self.gpus}, expected >= 0 (0: resources.num_gpus, one process)")
        if not self.preset:
            self.preset = self.name
        if self.preset not in model_presets():
            raise ConfigError(f"preset: unknown model size {self.preset!r}; the size registry (configs/model/) "
                              f"has {model_presets()}")


@dataclass
class GridConfig:
    """Sizes x (budgets | compute_levels) x lrs x batch_sizes. `budgets` gives every size the same
    training samples; `compute_levels` (FLOPs, counted as the runner counts them) gives every size
    the steps that reach each level: IsoFLOP lines (orchestration/sweep/plan.py). Exactly one of the two."""
    sizes: list[SizeSpec] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)  # training samples (rows) per trial
    compute_levels: list[float] = field(default_factory=list)  # training FLOPs per trial (IsoFLOP grid)
    min_steps: int = 4  # compute_levels: a (level, size) pair below this many steps is dropped
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    batch_sizes: list[int] = field(default_factory=lambda: [4])  # the lr x batch sub-grid, per size

    def validate(self) -> None:
        for name in ("sizes", "lrs", "batch_sizes"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: the grid needs at least one entry")
        if bool(self.budgets) == bool(self.compute_levels):
            raise ConfigError("budgets, compute_levels: give exactly one (samples per trial, or FLOPs per "
                              "trial for IsoFLOP lines)")
        if any(c <= 0 for c in self.compute_levels):
            raise ConfigError(f"compute_levels: got {self.compute_levels}, expected positive FLOPs")
        if len(set(self.compute_levels)) != len(self.compute_levels):
            raise ConfigError(f"compute_levels: got {self.compute_levels}, expected distinct levels")
        if self.min_steps < 1:
            raise ConfigError(f"min_steps: got {self.min_steps}, expected a positive integer")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ConfigError(f"sizes: names must be unique, got {names}")
        if any(lr <= 0 for lr in self.lrs):
            raise ConfigError(f"lrs: got {self.lrs}, expected positive numbers")
        if any(b <= 0 for b in self.batch_sizes):
            raise ConfigError(f"batch_sizes: got {self.batch_sizes}, expected positive integers")
        for budget in self.budgets:
            for b in self.batch_sizes:
                if budget < b:
                    raise ConfigError(f"budgets: budget {budget} samples is smaller than one batch "
                                      f"(batch_size {b}): the trial would train 0 steps")


@dataclass
class EvalConfig:
    """The held-out set. Synthetic data: `num_videos` fixed moving-square videos (a seed the training data
    never uses) and fixed noise. A dataset: up to `num_videos` samples of its held-out split (the fraction
    `heldout_fraction` of its keys, by hash, that no trial trains on), judged by the training evaluator
    (pretrain/evaluation/latent_eval.py: fixed noise levels, clip partitions and noise from `seed`)."""
    num_videos: int = 8
    seed: int = 12345
    heldout_fraction: float = 0.05  # with a dataset: the share of its samples held out (never trained on)

    def validate(self) -> None:
        if self.num_videos <= 0:
            raise ConfigError(f"num_videos: got {self.num_videos}, expected a positive integer")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction: got {self.heldout_fraction}, expected a fraction in (0, 1)")


@dataclass
class ResourceConfig:
    """Per-trial Ray resource request, and where a local Ray is started when none is given."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 1
    address: str = ""  # a Ray cluster; empty: start a local Ray on loopback
    local_num_cpus: int = 2


@dataclass
class FitConfig:
    """The fit and its trust checks (orchestration/sweep/identifiability.py)."""
    bootstrap: int = 100
    seed: int = 0
    level: float = 0.95
    compute_budgets: list[float] = field(default_factory=lambda: [1e18, 1e20, 1e22])
    min_points: int = 8  # (N, D) points below which the 5-parameter law is not identifiable
    min_distinct: int = 3  # distinct model sizes, and distinct data budgets, the law needs
    bound_tol: float = 0.01  # a parameter within this fraction of its box width of a bound is "at the bound"

    def validate(self) -> None:
        if not 0 < self.level < 1:
            raise ConfigError(f"level: got {self.level}, expected a probability in (0, 1)")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap: got {self.bootstrap}, expected >= 0")


@dataclass
class SweepConfig:
    name: str = "sweep"
    base: str = "configs/debug.yaml"  # base job config; relative paths from the repository root
    job_overrides: list[str] = field(default_factory=list)  # --section.key=value for every trial
    # a precomputed latent dataset root (/path, s3://bucket/prefix) the trials train on, sampled by the base
    # config's data.stage; empty: the base config's synthetic data (train.data=synthetic)
    dataset: str = ""
    out_dir: str = "runs/sweep"  # sweep directory: local path or s3://
    scratch_dir: str = ""  # local trial dirs when out_dir is remote (default: a temp dir)
    grid: GridConfig = field(default_factory=GridConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    fit: FitConfig = field(default_factory=FitConfig)

    def validate(self) -> None:
        for o in self.job_overrides:
            if not o.startswith("--") or "=" not in o:
                raise ConfigError(f"job_overrides: {o!r} is not of the form --section.key=value")
            if o.startswith(("--data.root=", "--data.sources=")):
                raise ConfigError(f"job_overrides: {o!r}; the sweep's data is its `dataset` key (a latent root, "
                                  "or empty for the base config's synthetic data)")
        check_dataset_url(self.dataset)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_dataset_url(url: str) -> None:
    """`dataset` names a dataset at all (no IO): not an unfilled placeholder, an S3 URL with a valid bucket."""
    if not url:
        return
    if any(c in url for c in "<>{}$") or url.strip() != url:
        raise ConfigError(f"dataset: {url!r} is a placeholder; set it to the precomputed latent root the trials "
                          "train on (vgpt precompute's output: /path or s3://bucket/prefix)")
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if scheme in ("s3", "s3a") and not _BUCKET.fullmatch(rest.split("/", 1)[0]):
            raise ConfigError(f"dataset: {url!r} has no valid S3 bucket name (3-63 lowercase letters, digits, '.' "
                              "or '-'); set it to the precomputed latent root the trials train on")


def as_dict(cfg: SweepConfig) -> dict:
    return dataclasses.asdict(cfg)
