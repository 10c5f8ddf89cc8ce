"""Parallel layout and engine settings: the `parallel:` section of the job config.

`parallel.deepspeed` is a mapping deep-merged over the DeepSpeed config that
parallel/engine.py generates, for DeepSpeed's own knobs we do not model
(bucket sizes, overlap_comm, contiguous_gradients, ...): the user's keys win.
Keys we derive from other config keys (batch sizes, ZeRO stage, precision,
clipping, the optimiser) cannot be set there: two places for one setting
would disagree silently, so `validate` names the key to set instead, before
any process group starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from jobconfig.errors import ConfigError

# DeepSpeed keys derived from our config (dotted path -> the key that sets it). Setting one under
# parallel.deepspeed is refused even with the same value: the other key is the one place to change it.
DERIVED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.batch_size and train.grad_accum_steps (x the data-parallel size)",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr, train.betas, train.eps, train.weight_decay (pretrain/training/optimizer.py)",
    "scheduler": "train.schedule and train.warmup_steps (pretrain/training/optimizer.py)",
    "zero_optimization.offload_optimizer.device": "parallel.offload_optimizer",
    "zero_optimization.offload_param.device": "parallel.offload_params",
}


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; a mapping's own dotted path is kept as well, with the mapping."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        path = f"{prefix}{k}"
        out[path] = v
        if isinstance(v, dict):
            out.update(_flatten(v, path + "."))
    return out


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
    # deep-merged over the generated DeepSpeed config (parallel/engine.py), e.g.
    # {zero_optimization: {reduce_bucket_size: 5e8, overlap_comm: false}}; derived keys refused
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: got {self.zero_stage}, expected one of [0, 1, 2, 3]")
        for name in ("tensor_parallel", "sequence_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"offload_params: needs zero_stage 3, got zero_stage {self.zero_stage}")
        self._validate_deepspeed()

    def _validate_deepspeed(self) -> None:
        """Refuse overrides of what our layout decides; DeepSpeed checks the rest at initialize."""
        if not isinstance(self.deepspeed, dict):
            raise ConfigError(f"deepspeed: got {self.deepspeed!r}, expected a mapping of DeepSpeed config keys")
        flat = _flatten(self.deepspeed)
        for path, value in flat.items():
            key = f"deepspeed.{path}"
            if path in DERIVED_DEEPSPEED_KEYS:
                raise ConfigError(f"{key}: derived from {DERIVED_DEEPSPEED_KEYS[path]}; set that instead")
            # the sections below may be mappings elsewhere; a scalar there would replace ours wholesale
            if path in ("zero_optimization", "bf16", "fp16") and not isinstance(value, dict):
                raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        stage = flat.get("zero_optimization.stage", self.zero_stage)
        if stage != self.zero_stage:
            raise ConfigError(f"deepspeed.zero_optimization.stage: conflicts with parallel.zero_stage="
                              f"{self.zero_stage}; set parallel.zero_stage")
        bf16 = flat.get("bf16.enabled", self.precision == "bf16")
        if bf16 != (self.precision == "bf16"):
            raise ConfigError(f"deepspeed.bf16.enabled: conflicts with parallel.precision={self.precision}; "
                              "set parallel.precision")
        if flat.get("fp16.enabled", False):
            raise ConfigError(f"deepspeed.fp16.enabled: conflicts with parallel.precision={self.precision} "
                              "(fp16 is not supported); set parallel.precision to bf16 or fp32")
        for section, flag in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
            if f"zero_optimization.{section}" in flat and not getattr(self, flag):
                raise ConfigError(f"deepspeed.zero_optimization.{section}: needs parallel.{flag}=true "
                                  f"(got false); set parallel.{flag}")
