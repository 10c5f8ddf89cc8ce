"""Renderers: one cluster + one stage's layout -> the files a launcher target needs.

Every target runs the same training entrypoint,
`python -m orchestration.cli train --config CONFIG --stage N [overrides]`, under
torchrun (c10d rendezvous, elastic node range, restart budget) or the DeepSpeed
launcher. Torchrun sets WORLD_SIZE, so `vgpt train` joins the group instead of
spawning. Scripts are `set -euo pipefail` bash with every value quoted, and they
never kill processes they did not start (no pkill/killall, unlike the reference).

The rendezvous follows torchrun's convention: the bash targets take the
address and port from `MASTER_ADDR` / `MASTER_PORT` when the environment sets
them, else from the cluster (`rendezvous.host`, or the allocation's first node
on Slurm; `rendezvous.port`); with no host anywhere torchrun.sh stops asking
for MASTER_ADDR. A one-node loopback cluster keeps 127.0.0.1 whatever the
environment says (nothing of a local run listens beyond the host).
Kubernetes: `k8s` is a Kubeflow Trainer v2 TrainJob on the cluster's torch
runtime (which sets torchrun's PET_* variables); `k8s-pytorchjob` the legacy
training-operator PyTorchJob (kubeflow.org/v1).
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

import yaml

from orchestration.launch.cluster import ClusterConfig
from orchestration.launch.layout import StageLayout
from parallel.device import is_loopback

ADDR_VAR, PORT_VAR = "MASTER_ADDR", "MASTER_PORT"   # torchrun's names
HEAD_NODE = 'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n'
ASCEND_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"


class Raw(str):
    """A shell word emitted verbatim (already quoted), e.g. `"${VAR}:29400"`."""


def sh_join(words) -> str:
    return " ".join(w if isinstance(w, Raw) else shlex.quote(str(w)) for w in words)


@dataclass
class LaunchSpec:
    """Everything the renderers share for one stage on one cluster."""
    cluster: ClusterConfig
    stage: int
    layout: StageLayout
    config: str                      # the curriculum YAML, relative to workdir
    overrides: list[str] = field(default_factory=list)
    cluster_data_root: bool = True   # the stage reads the cluster's storage.latents (False: its data.sources)
    memory_plans: list = field(default_factory=list)  # the stage's memory plan (orchestration/planning.py)

    @property
    def job_name(self) -> str:
        name = re.sub(r"[^a-z0-9-]+", "-", f"vgpt-{self.cluster.name}-stage{self.stage}".lower()).strip("-")
        return name[:50]

    def train_args(self) -> list[str]:
        c = self.cluster
        return ["-m", "orchestration.cli", "train", "--config", self.config, "--stage", str(self.stage),
                f"--parallel.device={c.accelerator}",
                *([f"--data.root={c.storage.latents}"] if self.cluster_data_root else []),
                f"--train.out_dir={c.storage.checkpoints}", *self.overrides, *self.layout.overrides()]

    @property
    def local(self) -> bool:
        """One node rendezvousing on loopback: nothing of the run may listen beyond this host."""
        return self.cluster.node_range == (1, 1) and is_loopback(self.cluster.rendezvous.host)

    def torchrun_args(self, host: str, nnodes: str | None = None) -> list[str]:
        c = self.cluster
        lo, hi = c.node_range
        local = ["--local-addr=127.0.0.1"] if self.local and is_loopback(host) else []
        return [f"--nnodes={nnodes or (str(lo) if lo == hi else f'{lo}:{hi}')}",
                f"--nproc-per-node={c.devices_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={host}:{c.rendezvous.port}", f"--rdzv-id={c.rendezvous.id}-stage{self.stage}",
                *local, f"--max-restarts={c.elastic.max_restarts}", *self.train_args()]

    def env(self) -> dict[str, str]:
        c, ic = self.cluster, self.cluster.interconnect
        env: dict[str, str] = {"OMP_NUM_THREADS": "1" if c.accelerator != "cpu" else "2"}
        if c.accelerator == "cuda":
            env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
            if ic.socket_ifname:
                env["NCCL_SOCKET_IFNAME"] = ic.socket_ifname
            if ic.ib_hca:
                env["NCCL_IB_HCA"] = ic.ib_hca
        elif c.accelerator == "npu":
            env["DS_ACCELERATOR"] = "npu"
            env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(c.devices_per_node))
            env["HCCL_CONNECT_TIMEOUT"] = str(ic.hccl_connect_timeout)
            env["HCCL_EXEC_TIMEOUT"] = str(ic.hccl_connect_timeout)
            if ic.socket_ifname:
                env["HCCL_SOCKET_IFNAME"] = ic.socket_ifname
        else:
            env["DS_ACCELERATOR"] = "cpu"
            if ic.socket_ifname:
                env["GLOO_SOCKET_IFNAME"] = ic.socket_ifname
        if self.local and c.accelerator == "cpu" and not ic.socket_ifname:
            env["GLOO_SOCKET_IFNAME"] = "lo"   # gloo's pair sockets stay on loopback too
        env.update(c.env)
        return env

    def header(self, what: str) -> str:
        lay = self.layout
        return (f"# {what}, generated by `vgpt launch` for stage {self.stage} on cluster {self.cluster.name!r}\n"
                f"# layout: {lay.world_size} devices = DP {lay.dp} x TP {lay.tp} x SP {lay.sp}; "
                f"about {lay.tokens} tokens per sample\n")

    def preamble(self) -> str:
        """cd, accelerator runtime setup and exports; shared by the bash targets."""
        lines = ["set -euo pipefail", f"cd {shlex.quote(self.cluster.workdir)}"]
        if self.cluster.accelerator == "npu":
            lines += [f"if [ -f {ASCEND_ENV} ]; then",
                      f"  # shellcheck disable=SC1091\n  source {ASCEND_ENV}", "fi",
                      f"{shlex.quote(self.cluster.python)} -c 'import torch_npu' "
                      "|| { echo 'torch_npu is not importable: install the CANN-matched build' >&2; exit 1; }"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        return "\n".join(lines) + "\n"

    def rendezvous_shell(self, default_host: str) -> tuple[str, Raw]:
        """Bash lines that set MASTER_ADDR/MASTER_PORT (the environment's, else the cluster's; an empty
        `default_host` makes MASTER_ADDR required) and the `--rdzv-endpoint=` word that uses them."""
        c = self.cluster
        port = f'{PORT_VAR}="${{{PORT_VAR}:-{c.rendezvous.port}}}"'
        if self.local:  # loopback by design: an inherited MASTER_ADDR must not move the store off the host
            addr = f"{ADDR_VAR}={shlex.quote(c.rendezvous.host)}"
        elif default_host:
            addr = f'{ADDR_VAR}="${{{ADDR_VAR}:-{default_host}}}"'
        else:
            addr = f': "${{{ADDR_VAR}:?set {ADDR_VAR} to the address of the first node (and {PORT_VAR} if not ' \
                   f'{c.rendezvous.port})}}"'
        return f"{addr}\n{port}\n", Raw(f'--rdzv-endpoint="${{{ADDR_VAR}}}:${{{PORT_VAR}}}"')

    def python_run(self) -> list[str]:
        # torchrun through orchestration/launch/local_torchrun.py: a refusal (bad input, a refused resume)
        # ends the job without spending its restarts, and a store on a loopback address (local runs)
        # listens on loopback only (torch's own listens on [::]); other addresses are torch's business.
        return [self.cluster.python, "-m", "orchestration.launch.local_torchrun", "torch.distributed.run"]


def render_torchrun(spec: LaunchSpec) -> dict[str, str]:
    """`torchrun.sh` to run on every node (c10d assigns node ranks) + `launch.json`."""
    host = spec.cluster.rendezvous.host
    args = spec.torchrun_args(host or f"${{{ADDR_VAR}}}")
    rdzv, endpoint = spec.rendezvous_shell(host)
    shell_args = [endpoint if a.startswith("--rdzv-endpoint=") else a for a in args]
    script = ("#!/usr/bin/env bash\n" + spec.header("torchrun on every node") + spec.preamble() + rdzv
              + "exec " + sh_join([*spec.python_run(), *shell_args]) + "\n")
    # the argv with the cluster's rendezvous; torchrun.sh puts $MASTER_ADDR:$MASTER_PORT in its place when set
    meta = {"stage": spec.stage, "layout": spec.layout.__dict__, "launcher": spec.python_run()[1:],
            "torchrun_argv": args, "env": spec.env(),
            "rendezvous": {ADDR_VAR: host or None, PORT_VAR: spec.cluster.rendezvous.port}}
    return {"torchrun.sh": script, "launch.json": json.dumps(meta, indent=2) + "\n"}  # render() redacts every file


def render_deepspeed(spec: LaunchSpec) -> dict[str, str]:
    """A DeepSpeed hostfile, `.deepspeed_env` (exported on every node) and `deepspeed.sh`."""
    c = spec.cluster
    hosts = c.hosts[:c.nodes] or [f"node-{i}" for i in range(c.nodes)]
    master = c.rendezvous.host or hosts[0]
    argv = ["--hostfile", "hostfile", "--num_nodes", str(c.nodes), "--num_gpus", str(c.devices_per_node),
            "--master_addr", master, "--master_port", str(c.rendezvous.port), "--module",
            *spec.train_args()[1:]]
    rdzv, _ = spec.rendezvous_shell(master)
    shell_argv = [Raw(f'"${{{ADDR_VAR}}}"') if a == master and argv[i - 1] == "--master_addr" else
                  Raw(f'"${{{PORT_VAR}}}"') if argv[i - 1] == "--master_port" else a for i, a in enumerate(argv)]
    script = ("#!/usr/bin/env bash\n" + spec.header("DeepSpeed launcher (pdsh/ssh to the hostfile)")
              + spec.preamble() + rdzv + "exec " + sh_join(["deepspeed", *shell_argv]) + "\n")
    return {"hostfile": "".join(f"{h} slots={c.devices_per_node}\n" for h in hosts),
            ".deepspeed_env": "".join(f"{k}={v}\n" for k, v in spec.env().items()),
            "deepspeed.sh": script, "deepspeed.json": json.dumps({"deepspeed_argv": argv}, indent=2) + "\n"}


def render_slurm(spec: LaunchSpec) -> dict[str, str]:
    """sbatch: one srun task per node, each a torchrun agent; rendezvous on the first node."""
    c, s = spec.cluster, spec.cluster.slurm
    directives = [f"--job-name={spec.job_name}", f"--nodes={c.nodes}", "--ntasks-per-node=1",
                  f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}", f"--output={spec.job_name}-%j.out"]
    if c.accelerator == "cuda":
        directives.append(f"--gpus-per-node={c.devices_per_node}")
    elif c.accelerator == "npu":
        directives.append(f"--gres=npu:{c.devices_per_node}")
    if s.partition:
        directives.append(f"--partition={s.partition}")
    if s.account:
        directives.append(f"--account={s.account}")
    srun = ["srun", f"--nodes={c.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if s.container_image and c.image:
        srun += [f"--container-image={c.image}", f"--container-workdir={c.workdir}"]
    rdzv, endpoint = spec.rendezvous_shell(c.rendezvous.host or "${head_node}")
    args = [endpoint if a.startswith("--rdzv-endpoint=") else a
            for a in spec.torchrun_args(f"${{{ADDR_VAR}}}", nnodes=str(c.nodes))]
    script = ("#!/usr/bin/env bash\n" + "".join(f"#SBATCH {d}\n" for d in directives)
              + spec.header("Slurm batch script") + spec.preamble()
              + (HEAD_NODE if "${head_node}" in rdzv else "") + rdzv
              + sh_join([*srun, *spec.python_run(), *args]) + "\n")
    return {"sbatch.sh": script}


def _k8s_resources(spec: LaunchSpec) -> dict:
    c, k = spec.cluster, spec.cluster.kubernetes
    devices = {"cuda": {"nvidia.com/gpu": c.devices_per_node},
               "npu": {"huawei.com/Ascend910": c.devices_per_node},
               "cpu": {}}[c.accelerator]
    limits = {**devices, "cpu": k.cpu, "memory": k.memory}
    return {"limits": dict(limits), "requests": dict(limits)}


def _k8s_metadata(spec: LaunchSpec) -> dict:
    return {"name": spec.job_name, "namespace": spec.cluster.kubernetes.namespace,
            "labels": {"app": "vgpt", "vgpt/stage": str(spec.stage)}}


SHM_VOLUME, SHM_PATH = "dshm", "/dev/shm"


def render_trainjob(spec: LaunchSpec) -> dict[str, str]:
    """A Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) on the cluster's torch runtime."""
    c, k = spec.cluster, spec.cluster.kubernetes
    # The torch runtime injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
    # PET_MASTER_PORT, which torchrun reads for the flags left out here. The trainer API has no working
    # directory: `sh -c 'cd "$0" && exec "$@"' WORKDIR ARGV...` enters it and runs ARGV unchanged.
    command = ["sh", "-c", 'cd "$0" && exec "$@"', c.workdir, *spec.python_run(),
               f"--max-restarts={c.elastic.max_restarts}", *spec.train_args()]
    pod = {"volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}}],
           "containers": [{"name": k.trainer_container, "volumeMounts": [{"name": SHM_VOLUME,
                                                                           "mountPath": SHM_PATH}]}]}
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    patch = {"manager": "vgpt.launch", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": k.trainer_job, "template": {"spec": {"template": {"spec": pod}}}}]}}}}
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": _k8s_metadata(spec),
           "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": k.runtime_kind, "name": k.runtime},
                    "trainer": {"image": c.image or "vgpt:latest", "command": command, "numNodes": c.nodes,
                                "numProcPerNode": c.devices_per_node, "resourcesPerNode": _k8s_resources(spec),
                                "env": [{"name": n, "value": v} for n, v in spec.env().items()]},
                    "runtimePatches": [patch]}}
    lo, hi = c.node_range
    note = (f"# elastic range {lo}..{hi} not applied: TrainJob runs a fixed {c.nodes} nodes (its torch runtime has "
            "no elastic policy yet; --target k8s-pytorchjob has one)\n" if (lo, hi) != (c.nodes, c.nodes) else "")
    return {"trainjob.yaml": spec.header(f"Kubeflow Trainer v2 TrainJob on {k.runtime_kind} {k.runtime!r}") + note
            + yaml.safe_dump(job, sort_keys=False)}


def render_pytorchjob(spec: LaunchSpec) -> dict[str, str]:
    """A legacy Kubeflow PyTorchJob (kubeflow.org/v1) with an elastic policy over Worker replicas."""
    c, k = spec.cluster, spec.cluster.kubernetes
    lo, hi = c.node_range
    host = f"{spec.job_name}-worker-0"
    command = spec.python_run() + spec.torchrun_args(host)
    container = {"name": "pytorch", "image": c.image or "vgpt:latest", "imagePullPolicy": "IfNotPresent",
                 "workingDir": c.workdir, "command": command,
                 "env": [{"name": n, "value": v} for n, v in spec.env().items()],
                 "resources": _k8s_resources(spec),
                 "volumeMounts": [{"name": SHM_VOLUME, "mountPath": SHM_PATH}]}
    pod_spec = {"containers": [container],
                "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}}]}
    if k.service_account:
        pod_spec["serviceAccountName"] = k.service_account
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _k8s_metadata(spec),
           "spec": {"elasticPolicy": {"rdzvBackend": "c10d", "rdzvHost": host, "rdzvPort": c.rendezvous.port,
                                      "rdzvId": f"{c.rendezvous.id}-stage{spec.stage}", "minReplicas": lo,
                                      "maxReplicas": hi, "maxRestarts": c.elastic.max_restarts},
                    "nprocPerNode": str(c.devices_per_node),
                    "pytorchReplicaSpecs": {"Worker": {"replicas": c.nodes, "restartPolicy": "OnFailure",
                                                       "template": {"spec": pod_spec}}}}}
    text = spec.header("Kubeflow PyTorchJob (legacy kubeflow.org/v1)") + yaml.safe_dump(job, sort_keys=False)
    return {"pytorchjob.yaml": text}


def render_ray(spec: LaunchSpec) -> dict[str, str]:
    """`ray job submit` for the precompute farm (the latents this stage trains on)."""
    c, r = spec.cluster, spec.cluster.ray
    runtime_env: dict = {"env_vars": spec.env()}
    if r.pip:
        runtime_env["pip"] = list(r.pip)
    entry = [c.python, "-m", "orchestration.cli", "precompute", "--config", r.precompute_config,
             f"--precompute.output.root={c.storage.latents}"]
    if c.storage.videos:
        entry.append(f"--precompute.inputs.glob={c.storage.videos}")
    submit = ["ray", "job", "submit", "--address", r.address, "--working-dir", ".",
              "--runtime-env-json", json.dumps(runtime_env, sort_keys=True), "--", *entry]
    script = ("#!/usr/bin/env bash\n" + spec.header("Ray job: precompute latents") + "set -euo pipefail\n"
              + f"cd {shlex.quote(c.workdir)}\n" + "exec " + sh_join(submit) + "\n")
    return {"ray_precompute.sh": script, "ray_runtime_env.json": json.dumps(runtime_env, indent=2) + "\n"}


TARGETS = {"torchrun": render_torchrun, "deepspeed": render_deepspeed, "slurm": render_slurm,
           "k8s": render_trainjob, "k8s-pytorchjob": render_pytorchjob, "ray": render_ray}
