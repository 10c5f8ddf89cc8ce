"""The `configs/cluster/*.yaml` schema: one description of a cluster's shape.

`vgpt launch` renders torchrun, DeepSpeed, Slurm, Kubernetes and Ray launch
files from one of these plus one curriculum stage, so the per-stage hand-edited
scripts of the reference become data. Loaded strictly like job configs:
`load_config(path, overrides, cls=ClusterConfig)`; unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from jobconfig.errors import ConfigError
from jobconfig.plan import device_spec
from jobconfig.secrets import check_no_credentials


@dataclass
class InterconnectConfig:
    """Hints for the collective library (NCCL on cuda, HCCL on npu, gloo on cpu)."""
    socket_ifname: str = ""       # NCCL_SOCKET_IFNAME / HCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME
    ib_hca: str = ""              # NCCL_IB_HCA (InfiniBand adapters), cuda only
    hccl_connect_timeout: int = 1200  # seconds, npu only (HCCL_CONNECT_TIMEOUT)


@dataclass
class RendezvousConfig:
    """torchrun c10d rendezvous. An empty host means "the first node" (found by the target)."""
    host: str = ""
    port: int = 29400
    id: str = "vgpt"


@dataclass
class ElasticConfig:
    """Elastic node range for torchrun `--nnodes MIN:MAX`; null means `nodes`."""
    min_nodes: Optional[int] = None
    max_nodes: Optional[int] = None
    max_restarts: int = 3         # torchrun restarts; each resumes from the newest checkpoint


@dataclass
class StorageConfig:
    latents: str = "runs/latents"        # data.root for training (s3://, gs://, or a shared path)
    checkpoints: str = "runs/pretrain"   # train.out_dir
    videos: str = ""                     # precompute input, for the Ray precompute job


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    time: str = "72:00:00"
    cpus_per_task: int = 64
    container_image: bool = False  # run inside `image` through pyxis (--container-image)


@dataclass
class KubernetesConfig:
    """`--target k8s` (a Kubeflow Trainer v2 TrainJob) and `k8s-pytorchjob` (the legacy PyTorchJob)."""
    namespace: str = "default"
    # the TrainJob's runtime: a (Cluster)TrainingRuntime with the torch ML policy; Kubeflow Trainer
    # installs `torch-distributed`. The job overrides its image, command, nodes and resources
    runtime: str = "torch-distributed"
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    trainer_job: str = "node"        # the runtime's replicated job and container that run the trainer
    trainer_container: str = "node"
    service_account: str = ""
    shm_size: str = "64Gi"         # /dev/shm for dataloader workers
    cpu: int = 64
    memory: str = "512Gi"


@dataclass
class ClusterRayConfig:
    address: str = "http://127.0.0.1:8265"  # `ray job submit --address`
    precompute_config: str = "configs/precompute/sdxl.yaml"
    pip: list[str] = field(default_factory=list)  # runtime_env pip packages, if the image lacks them


@dataclass
class ClusterConfig:
    name: str = "cluster"
    nodes: int = 1
    devices_per_node: int = 8
    accelerator: Literal["cuda", "npu", "cpu"] = "cuda"
    # the device kind the memory plan fits stages to (jobconfig/plan.py DEVICES: h100-80gb, h200, 910b, ...);
    # empty: the accelerator's usual one (orchestration/planning.py)
    device: str = ""
    hosts: list[str] = field(default_factory=list)  # DeepSpeed hostfile names; empty = node-0..node-N-1
    image: str = ""                # container image (Kubernetes, Slurm+pyxis)
    python: str = "python"         # the interpreter on the nodes
    workdir: str = "."             # repository checkout on the nodes (or in the image)
    tensor_parallel: int = 1       # TP for every stage, inside a node; 1 = each stage's own setting
    # "stage" = each stage's parallel.sequence_parallel; "auto" = smallest SP dividing
    # the heads whose tokens per rank fit tokens_per_device; or a number for every stage
    sequence_parallel: Union[int, str] = "stage"
    tokens_per_device: int = 40000  # the per-device token budget "auto" SP aims for
    latent_size: list[int] = field(default_factory=lambda: [40, 40])  # latent H, W (320 px / 8), for "auto" SP
    interconnect: InterconnectConfig = field(default_factory=InterconnectConfig)
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    ray: ClusterRayConfig = field(default_factory=ClusterRayConfig)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every process

    def validate(self) -> None:
        for key in ("nodes", "devices_per_node", "tensor_parallel", "tokens_per_device"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: got {getattr(self, key)}, expected a positive integer")
        sp = self.sequence_parallel
        if isinstance(sp, str) and sp not in ("stage", "auto"):
            raise ConfigError(f"sequence_parallel: got {sp!r}, expected 'stage', 'auto' or a positive integer")
        if isinstance(sp, int) and sp < 1:
            raise ConfigError(f"sequence_parallel: got {sp}, expected 'stage', 'auto' or a positive integer")
        if len(self.latent_size) != 2:
            raise ConfigError(f"latent_size: got {self.latent_size}, expected [height, width]")
        lo, hi = self.node_range
        if not 1 <= lo <= self.nodes <= hi:
            raise ConfigError(f"elastic: min_nodes={lo} <= nodes={self.nodes} <= max_nodes={hi} does not hold")
        if self.hosts and len(self.hosts) < hi:
            raise ConfigError(f"hosts: {len(self.hosts)} names for up to {hi} nodes")
        if self.elastic.max_restarts < 0:
            raise ConfigError(f"elastic.max_restarts: got {self.elastic.max_restarts}, expected >= 0")
        if self.device:
            device_spec(self.device, "device")
        check_no_credentials(self.env, "env")   # written into every launch file

    @property
    def node_range(self) -> tuple[int, int]:
        e = self.elastic
        return (e.min_nodes if e.min_nodes is not None else self.nodes,
                e.max_nodes if e.max_nodes is not None else self.nodes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
