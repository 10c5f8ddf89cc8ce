"""`JobConfig`: the one typed config tree of a job, every section nested.
"""
from __future__ import annotations

import dataclasses

from jobconfig.data import DataConfig, SyntheticDataConfig
from jobconfig.model import ModelConfig
from jobconfig.parallel import ParallelConfig
from jobconfig.precompute import PrecomputeConfig
from jobconfig.predict import PredictConfig
from jobconfig.train import ObjectiveConfig, TrainConfig


@dataclasses.dataclass
class JobConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    synthetic: SyntheticDataConfig = dataclasses.field(default_factory=SyntheticDataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    precompute: PrecomputeConfig = dataclasses.field(default_factory=PrecomputeConfig)
    predict: PredictConfig = dataclasses.field(default_factory=PredictConfig)
