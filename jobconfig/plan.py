"""`plan:` section and the one table of accelerators: memory and peak FLOP/s per device kind.

`vgpt plan` and the preflight of `vgpt train` / `vgpt launch` plan a stage's
per-device memory and step time on paper (pretrain/training/memory_plan.py)
against one of these devices; the MFU bookkeeping of training
(pretrain/training/metrics.py `peak_flops`) reads its peak FLOP/s from the same
table, so a new accelerator is one row here.

Memory is in GiB (2^30 bytes; what `torch.cuda.get_device_properties().total_memory`
reports, which nvidia-smi calls MiB / 1024). `reserve_gib` is what the runtime
holds outside the caching allocator's tensors (CUDA/CANN context, NCCL/HCCL
communicators and their buffers, allocator fragmentation headroom): a layout
fits when its planned peak of allocated tensors plus the reserve is at most the
device's memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jobconfig.errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    kind: str              # the name `--device` / `plan.device` take
    name: str              # human name
    memory_gib: float      # device memory as the runtime reports its total
    peak_flops: float      # dense bf16 FLOP/s, for MFU and the planned step time
    accelerator: str       # cuda | npu | cpu: what parallel.device becomes
    attention: str         # the backend model.attention=auto picks there (pretrain/model/attention.py)
    match: str = ""        # substring of the runtime's device name (torch.cuda.get_device_name)
    reserve_gib: float = 0.0


# order matters for `match`: the first row whose substring the runtime's name contains wins
DEVICES: dict[str, DeviceSpec] = {d.kind: d for d in (
    DeviceSpec("h100-80gb", "NVIDIA H100 80GB", 79.6, 989e12, "cuda", "flex", "H100", 2.5),
    DeviceSpec("h200", "NVIDIA H200 141GB", 140.4, 989e12, "cuda", "flex", "H200", 2.5),
    DeviceSpec("a100-80gb", "NVIDIA A100 80GB", 79.2, 312e12, "cuda", "flex", "A100", 2.5),
    DeviceSpec("910b", "Ascend 910B 64GB", 64.0, 313e12, "npu", "blockwise", "910B", 4.0),
)}


def device_spec(kind: str, key: str = "plan.device") -> DeviceSpec:
    """The table's row for `kind`, or a ConfigError naming `key` and the kinds there are."""
    if kind not in DEVICES:
        raise ConfigError(f"{key}: got {kind!r}, expected one of {sorted(DEVICES)} (jobconfig/plan.py DEVICES)")
    return DEVICES[kind]


def device_by_name(name: str) -> Optional[DeviceSpec]:
    """The row whose `match` is in a runtime device name ('NVIDIA H100 80GB HBM3'), or None."""
    return next((d for d in DEVICES.values() if d.match and d.match in name), None)


@dataclass
class PlanConfig:
    """What `vgpt plan` and the preflight plan against (pretrain/training/memory_plan.py)."""
    # a DEVICES kind (h100-80gb, h200, a100-80gb, 910b); null: the preflight checks only when the
    # accelerator names itself (CUDA), never on CPU runs
    device: Optional[str] = None
    ignore: bool = False          # start a layout even when its plan says it does not fit
    mfu: float = 0.4              # model FLOPs utilisation the planned step time assumes
    # latent H, W of the frames to plan for; null: the synthetic latents' size (train.data: synthetic), else
    # 40 x 40 (320 px / 8); `vgpt launch` and `vgpt plan --cluster` take the cluster's latent_size
    latent_size: Optional[list[int]] = None
    # tokens per sample to plan for; null: the stage's longest (every clip one frame, capped by
    # data.stage.max_tokens), the sample that sets the peak
    tokens: Optional[int] = None

    def validate(self) -> None:
        if self.device is not None:
            device_spec(self.device, "device")
        if not 0.0 < self.mfu <= 1.0:
            raise ConfigError(f"mfu: got {self.mfu}, expected a value in (0, 1]")
        if self.latent_size is not None and (len(self.latent_size) != 2 or min(self.latent_size) < 1):
            raise ConfigError(f"latent_size: got {self.latent_size}, expected [height, width] of positive ints")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(f"tokens: got {self.tokens}, expected a positive integer or null")
