"""`vgpt launch`: write the launch files for one curriculum stage on one cluster.

    vgpt launch --stage 4 --cluster configs/cluster/h100-slurm.yaml --target slurm --out launch/s4
    vgpt launch --stage 1 --cluster configs/cluster/local-cpu.yaml --target torchrun --out DIR \
        [--config configs/pretrain.yaml] [--cluster.key=value ...] [--section.key=value ...]

Replaces the reference's hand-edited per-stage bash scripts: the stage's config
comes from the curriculum (`plan_stages`), the cluster's shape from
`configs/cluster/*.yaml`, and the parallel layout (DP x TP x SP) is derived and
checked for every node count of the elastic range before anything is written.
`--cluster.x=y` overrides edit the cluster description; other `--a.b=c`
overrides go to the training job (and into the rendered command).
"""
from __future__ import annotations

import os
from pathlib import Path

from jobconfig.curriculum import plan_stages
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from orchestration.launch.cluster import ClusterConfig
from orchestration.launch.layout import StageLayout, stage_layout
from orchestration.launch.targets import TARGETS, LaunchSpec


def plan_launch(stage: int, cluster_path: str, config: str = "configs/pretrain.yaml",
                overrides: list[str] = (), cluster_overrides: list[str] = ()) -> LaunchSpec:
    """Load the cluster and the stage, derive the layout; raises ConfigError naming the stage."""

    cluster = load_config(cluster_path, list(cluster_overrides), cls=ClusterConfig)
    storage = [f"--data.root={cluster.storage.latents}", f"--train.out_dir={cluster.storage.checkpoints}",
               f"--parallel.device={cluster.accelerator}"]
    plan = plan_stages(config, [*storage, *overrides], stage)
    if not 1 <= stage <= len(plan):
        raise ConfigError(f"--stage: got {stage}, expected 1..{len(plan)}")
    name, cfg = plan[stage - 1]
    layout: StageLayout = stage_layout(name, cfg, cluster)
    return LaunchSpec(cluster=cluster, stage=stage, layout=layout, config=config, overrides=list(overrides))


def render(spec: LaunchSpec, target: str, out: str | Path) -> list[Path]:
    """Write the target's files under `out`; returns their paths (scripts are made executable)."""
    if target not in TARGETS:
        raise ConfigError(f"--target: got {target!r}, expected one of {sorted(TARGETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in TARGETS[target](spec).items():
        assert "pkill" not in text and "killall" not in text, "launch files never kill foreign processes"
        path = out / fname
        path.write_text(text)
        if fname.endswith(".sh"):
            os.chmod(path, 0o755)
        written.append(path)
    return written
