"""A launch of one curriculum stage on one cluster: plan it, then render its files.

`plan_launch` loads the cluster description (configs/cluster/*.yaml) and the
stage's config from the curriculum (jobconfig/curriculum.py) with the
cluster's storage and accelerator, and derives the stage's parallel layout
(DP x TP x SP, layout.py) for every node count of the elastic range, so an
impossible launch fails before anything is written; so does a layout whose memory
plan does not fit the cluster's device (orchestration/planning.py). `render` writes one
target's files (targets.py) under a directory, scripts executable.
"""
from __future__ import annotations

import os
from pathlib import Path

from jobconfig.curriculum import plan_stages
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from jobconfig.secrets import redact_text
from orchestration.launch.cluster import ClusterConfig
from orchestration.launch.layout import StageLayout, stage_layout
from orchestration.launch.targets import TARGETS, LaunchSpec
from orchestration.planning import check_fits, launch_device


def plan_launch(stage: int, cluster_path: str, config: str = "configs/pretrain.yaml",
                overrides: list[str] = (), cluster_overrides: list[str] = ()) -> LaunchSpec:
    """Load the cluster and the stage, derive the layout; raises ConfigError naming the stage."""
    cluster = load_config(cluster_path, list(cluster_overrides), cls=ClusterConfig, flag_prefix="cluster.")
    storage = [f"--train.out_dir={cluster.storage.checkpoints}", f"--parallel.device={cluster.accelerator}"]
    # the cluster's dataset (storage.latents) is the stage's data.root, unless the stage blends its own
    # data.sources (a root next to them would be refused)
    blend = bool(plan_stages(config, [*storage, *overrides], stage)[stage - 1][1].data.sources)
    if not blend:
        storage.append(f"--data.root={cluster.storage.latents}")
    name, cfg = plan_stages(config, [*storage, *overrides], stage)[stage - 1]
    layout: StageLayout = stage_layout(name, cfg, cluster)
    spec = LaunchSpec(cluster=cluster, stage=stage, layout=layout, config=config, overrides=list(overrides),
                      cluster_data_root=not blend)
    # the memory plan of the layout the files will start, on the cluster's device: refused now if it does
    # not fit (orchestration/planning.py); `render` callers write it next to the files
    cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel = layout.tp, layout.sp
    if cfg.plan.latent_size is None:
        cfg.plan.latent_size = list(cluster.latent_size)
    spec.memory_plans = check_fits([(name, cfg)], layout.world_size,
                                   lambda c: launch_device(c, cluster.device, cluster.accelerator))
    return spec


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
        path.write_text(redact_text(text))   # never a credential variable's value on disk
        if fname.endswith(".sh"):
            os.chmod(path, 0o755)
        written.append(path)
    return written
