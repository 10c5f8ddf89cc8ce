"""Per-stage parallel layout on a cluster: DP x TP x SP, derived and checked before launch.

`stage_layout(stage_name, job_cfg, cluster)` picks TP (cluster's, or the
stage's) and SP (the stage's, a cluster-wide number, or derived from the
stage's sequence length and the cluster's per-device token budget), then lets
`ParallelDims` do the arithmetic for every node count the elastic range allows.
Impossible layouts raise ConfigError naming the stage, the keys and the numbers,
so a bad launch file is never written.
"""
from __future__ import annotations

from dataclasses import dataclass

from data.batch import patches_per_frame, sequence_length
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from orchestration.launch.cluster import ClusterConfig
from parallel.dims import ParallelDims


@dataclass(frozen=True)
class StageLayout:
    stage: str
    tp: int
    sp: int
    dp: int            # at `cluster.nodes`; elastic sizes change it, not TP or SP
    world_size: int
    tokens: int        # estimated tokens per sample (one clip, no clean copies)

    def overrides(self) -> list[str]:
        return [f"--parallel.tensor_parallel={self.tp}", f"--parallel.sequence_parallel={self.sp}"]


def estimate_tokens(cfg: JobConfig, cluster: ClusterConfig) -> int:
    """Tokens of the stage's shortest full-length sample at the cluster's latent size."""
    patches = patches_per_frame(tuple(cluster.latent_size), cfg.model.patch_size)
    return sequence_length([[cfg.data.stage.frames]], max(patches, 1))


def derive_sp(stage: str, cfg: JobConfig, cluster: ClusterConfig, tp: int, tokens: int) -> int:
    """Smallest SP dividing the heads per TP rank whose tokens per rank fit the budget."""
    heads = cfg.model.num_heads // tp
    for sp in range(1, heads + 1):
        if heads % sp == 0 and -(-tokens // sp) <= cluster.tokens_per_device:
            return sp
    raise ConfigError(f"{stage}: about {tokens} tokens per sample do not fit tokens_per_device="
                      f"{cluster.tokens_per_device} even with sequence parallel over all {heads} heads per "
                      f"tensor-parallel rank (model.num_heads={cfg.model.num_heads}, tensor_parallel={tp})")


def stage_layout(stage: str, cfg: JobConfig, cluster: ClusterConfig) -> StageLayout:
    where = f"cluster {cluster.name!r}: {cluster.nodes} nodes x {cluster.devices_per_node} devices"
    tp = cluster.tensor_parallel if cluster.tensor_parallel > 1 else cfg.parallel.tensor_parallel
    if tp > cluster.devices_per_node:
        raise ConfigError(f"{stage}: parallel.tensor_parallel={tp} exceeds devices_per_node="
                          f"{cluster.devices_per_node} ({where}); tensor parallel must stay inside one node")
    if cluster.devices_per_node % tp:
        raise ConfigError(f"{stage}: parallel.tensor_parallel={tp} does not divide devices_per_node="
                          f"{cluster.devices_per_node} ({where}); a TP group would straddle two nodes")
    tokens = estimate_tokens(cfg, cluster)
    if cluster.sequence_parallel == "stage":
        sp = cfg.parallel.sequence_parallel
    elif cluster.sequence_parallel == "auto":
        if cfg.model.num_heads % tp:
            raise ConfigError(f"{stage}: parallel.tensor_parallel={tp} does not divide "
                              f"model.num_heads={cfg.model.num_heads} ({where})")
        sp = derive_sp(stage, cfg, cluster, tp, tokens)
    else:
        sp = int(cluster.sequence_parallel)
    lo, hi = cluster.node_range
    dims = None
    for nodes in [cluster.nodes] + [n for n in range(lo, hi + 1) if n != cluster.nodes]:
        world = nodes * cluster.devices_per_node
        try:
            d = ParallelDims(world, tp, sp)
            d.check_model(cfg.model)
        except ConfigError as e:
            raise ConfigError(f"{stage}: {e} ({where}, checking {nodes} nodes = {world} devices; "
                              f"elastic range {lo}..{hi})") from None
        if nodes == cluster.nodes:
            dims = d
    return StageLayout(stage=stage, tp=tp, sp=sp, dp=dims.dp, world_size=dims.world_size, tokens=tokens)
