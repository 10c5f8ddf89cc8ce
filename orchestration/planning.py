"""The memory plan as the commands use it: which device a run plans against, refusal, the plan file.

`vgpt plan` prints it (cli/plan.py); `vgpt train` and `vgpt launch` plan the
layout they are about to start and refuse one that does not fit, before any
process group (exit 2, one line: the stage, the shortfall in GB, the smallest
fix, and `--plan.ignore=true` to start anyway). `vgpt launch` writes the plan
next to its launch files (`plan.txt`, `plan.json`).

Which device: `plan.device` when set; else what the run will use: for `vgpt
launch` the cluster's `device` (configs/cluster/*.yaml), else its accelerator's
usual kind (npu: 910b; cuda: h100-80gb, named as assumed); for `vgpt train`
the local GPU's name (nvidia-smi, so CUDA is not initialised before the
process group), an NPU run's 910b. A CPU run plans against no device: the host
has no fixed memory to fit (it swaps, other jobs share it) and every test runs
there, so the check is skipped and nothing about CPU runs changes; `vgpt plan`
still prints the host's breakdown.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

from data.buckets import Buckets, heaviest_shape
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.plan import GIB, DeviceSpec, device_by_name, device_spec
from pretrain.training.memory_plan import StagePlan, format_plan, plan_stage

log = logging.getLogger(__name__)
ACCELERATOR_DEFAULT = {"npu": "910b", "cuda": "h100-80gb"}


def local_gpu_kind() -> str | None:
    """The DEVICES kind of this machine's first GPU, read from nvidia-smi (no CUDA context)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    spec = device_by_name(out[0]) if out else None
    return spec.kind if spec else None


def train_device(cfg: JobConfig) -> DeviceSpec | None:
    """The device `vgpt train` plans against (module docstring), or None on a CPU run."""
    if cfg.plan.device:
        return device_spec(cfg.plan.device)
    if cfg.parallel.device == "npu":
        return device_spec("910b")
    if cfg.parallel.device in ("cuda", "auto"):
        kind = local_gpu_kind()
        return device_spec(kind) if kind else None
    return None


def launch_device(cfg: JobConfig, cluster_device: str, accelerator: str) -> DeviceSpec | None:
    if cfg.plan.device:
        return device_spec(cfg.plan.device)
    if cluster_device:
        return device_spec(cluster_device, "cluster.device")
    kind = ACCELERATOR_DEFAULT.get(accelerator)
    return device_spec(kind) if kind else None


def refusal(p: StagePlan) -> str:
    """The one line a refused layout prints."""
    short = (p.peak - p.capacity) / GIB
    fix = f"smallest fix: {p.fix}" if p.fix else "no change at this world size fits (more devices, or fewer tokens)"
    return (f"{p.stage}: {p.layout.describe()} does not fit {p.device.name}: planned peak {p.peak / GIB:.1f} GB "
            f"per device, {short:.1f} GB short of {p.capacity / GIB:.1f} GB usable; {fix}; "
            f"--plan.ignore=true starts it anyway")


def check_fits(stages: list[tuple[str, JobConfig]], world_size: int, device_of,
               latent_sizes: dict[str, tuple[int, int]] | None = None) -> list[StagePlan]:
    """Plan every stage (`device_of(cfg)`: its device or None) and refuse the first that does not fit,
    unless its plan.ignore is set; returns the plans. `latent_sizes`: a stage's latent shape to plan
    for, by stage name (its dataset's heaviest: `dataset_latent_size`), else the default."""
    plans = []
    for name, cfg in stages:
        device = device_of(cfg)
        if device is None:
            continue
        p = plan_stage(cfg, world_size, device, (latent_sizes or {}).get(name), stage=name)
        if p.fits is False:
            if not cfg.plan.ignore:
                raise ConfigError(refusal(p))
            log.warning("starting anyway (plan.ignore=true): %s", refusal(p).rsplit(";", 1)[0])
        plans.append(p)
    return plans


def dataset_latent_size(cfg: JobConfig, buckets: list[Buckets]) -> tuple[int, int] | None:
    """The latent shape a latent-data stage plans for: plan.latent_size when set, else the heaviest
    of its datasets' shape buckets (data/buckets.py `heaviest_shape`: most tokens a step), else None."""
    if cfg.plan.latent_size:
        return tuple(cfg.plan.latent_size)
    return heaviest_shape([name for b in buckets for name in b.names], cfg.data)


def write_plan(out: str | Path, plans: list[StagePlan]) -> list[Path]:
    """plan.txt (the table) and plan.json (the numbers) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    txt, js = out / "plan.txt", out / "plan.json"
    txt.write_text("\n\n".join(format_plan(p) for p in plans) + "\n")
    js.write_text(json.dumps([p.to_dict() for p in plans], indent=2) + "\n")
    return [txt, js]
