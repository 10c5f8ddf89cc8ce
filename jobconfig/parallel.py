"""Parallel layout and engine settings: the `parallel:` section of the job config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobconfig.errors import ConfigError


@dataclass
class ParallelConfig:
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    tensor_parallel: int = 1      # megatron-core Column/RowParallelLinear over the backbone
    sequence_parallel: int = 1    # Ulysses all-to-all around the clip attention
    zero_stage: int = 2           # DeepSpeed ZeRO 0..3 (the reference uses ZeRO-2)
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    precision: Literal["fp32", "bf16"] = "bf16"
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: got {self.zero_stage}, expected one of [0, 1, 2, 3]")
        for name in ("tensor_parallel", "sequence_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"offload_params: needs zero_stage 3, got zero_stage {self.zero_stage}")
