"""`JobConfig`: the one typed config tree of a job, every section nested.
"""
from __future__ import annotations

import dataclasses

from jobconfig.data import DataConfig, SyntheticDataConfig
from jobconfig.errors import ConfigError
from jobconfig.eval import EvalConfig
from jobconfig.model import ModelConfig
from jobconfig.parallel import ParallelConfig
from jobconfig.plan import PlanConfig
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
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)  # `vgpt plan` and the preflight's memory plan

    def validate(self) -> None:
        """Checks across sections (each section validates its own keys first)."""
        try:
            self.eval.check_source(self.train.data)
            pc = self.parallel
            self.eval.check_predict(self.train.data, pc.zero_stage, pc.tensor_parallel, pc.sequence_parallel)
        except ConfigError as e:
            raise ConfigError(f"eval.{e}") from None
