"""`vgpt launch`: rendered launch files are valid for every example cluster and stage,
impossible layouts fail naming the stage and numbers, and the rendered torchrun
commands really train (1 node x 2 processes; 2 simulated nodes on loopback)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from torch.distributed.run import get_args_parser

from jobconfig.errors import ConfigError
from orchestration.launch.plan import plan_launch, render
from orchestration.launch.targets import TARGETS

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = sorted(p.name for p in (REPO / "configs/cluster").glob("*.yaml"))
STAGES = (1, 2, 3, 4)
TINY = ["--model.preset=debug", "--model.attention=blockwise", "--train.data=synthetic", "--train.steps=3",
        "--train.log_every=1", "--parallel.precision=fp32", "--parallel.sequence_parallel=1",
        "--parallel.activation_checkpointing=false", "--train.tensorboard=false"]


def cluster(name: str) -> str:
    return str(REPO / "configs/cluster" / name)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """{(cluster, stage, target): out dir} for every example cluster, stage and target."""
    root = tmp_path_factory.mktemp("launch")
    out = {}
    for c in CLUSTERS:
        for s in STAGES:
            spec = plan_launch(s, cluster(c))
            for t in TARGETS:
                d = root / c / f"s{s}" / t
                render(spec, t, d)
                out[(c, s, t)] = (spec, d)
    return out


def parse_torchrun(argv: list[str]):
    args = get_args_parser().parse_args(argv)
    assert args.module and args.training_script == "orchestration.cli" and args.rdzv_backend == "c10d"
    return args


def test_examples_cover_the_issue():
    assert {"local-cpu.yaml", "single-gpu-node.yaml", "h100-slurm.yaml", "k8s-gpu.yaml",
            "ascend-910b.yaml"} <= set(CLUSTERS)


@pytest.mark.parametrize("name", CLUSTERS)
def test_torchrun_commands_parse_with_torchruns_parser(rendered, name):
    for s in STAGES:
        spec, d = rendered[(name, s, "torchrun")]
        meta = json.loads((d / "launch.json").read_text())
        args = parse_torchrun(meta["torchrun_argv"])
        lo, hi = spec.cluster.node_range
        assert args.nnodes == (str(lo) if lo == hi else f"{lo}:{hi}")
        assert int(args.nproc_per_node) == spec.cluster.devices_per_node
        assert args.max_restarts == spec.cluster.elastic.max_restarts
        assert args.rdzv_endpoint.endswith(f":{spec.cluster.rendezvous.port}")
        rest = args.training_script_args
        assert rest[:1] == ["train"] and rest[rest.index("--stage") + 1] == str(s)
        assert f"--parallel.sequence_parallel={spec.layout.sp}" in rest
        # the script runs exactly that argv
        line = (d / "torchrun.sh").read_text().strip().splitlines()[-1]
        words = shlex.split(line)
        assert words[words.index("torch.distributed.run") + 1:] == meta["torchrun_argv"]


@pytest.mark.parametrize("name", CLUSTERS)
def test_slurm_and_deepspeed_and_ray_scripts(rendered, name):
    from deepspeed.launcher.runner import parse_args as ds_parse

    for s in STAGES:
        spec, d = rendered[(name, s, "slurm")]
        text = (d / "sbatch.sh").read_text()
        assert f"#SBATCH --nodes={spec.cluster.nodes}" in text and "#SBATCH --ntasks-per-node=1" in text
        srun = shlex.split(text.strip().splitlines()[-1])
        assert srun[0] == "srun"
        args = parse_torchrun(srun[srun.index("torch.distributed.run") + 1:])
        assert args.nnodes == str(spec.cluster.nodes) and args.rdzv_endpoint.startswith("${head_node}:")
        _, d = rendered[(name, s, "deepspeed")]
        hosts = (d / "hostfile").read_text().splitlines()
        assert len(hosts) == spec.cluster.nodes and all(h.endswith(f"slots={spec.cluster.devices_per_node}")
                                                       for h in hosts)
        ds = ds_parse(json.loads((d / "deepspeed.json").read_text())["deepspeed_argv"])
        assert ds.module and ds.user_script == "orchestration.cli" and ds.user_args[0] == "train"
        _, d = rendered[(name, s, "ray")]
        ray_line = shlex.split((d / "ray_precompute.sh").read_text().strip().splitlines()[-1])
        assert ray_line[1:4] == ["ray", "job", "submit"] and "precompute" in ray_line
        json.loads(ray_line[ray_line.index("--runtime-env-json") + 1])
    for (c, _, _), (_, d) in rendered.items():
        if c == name:
            for f in d.iterdir():
                text = f.read_text()
                assert "pkill" not in text and "killall" not in text
                if f.suffix == ".sh":
                    res = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
                    assert res.returncode == 0, f"{f}: {res.stderr}"


def test_scripts_pass_shellcheck(rendered):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not on PATH (scripts/install.sh installs it when run as root on Debian)")
    scripts = sorted(str(f) for _, d in rendered.values() for f in d.glob("*.sh"))
    res = subprocess.run(["shellcheck", "-s", "bash", *scripts], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:]


# the PyTorchJob (kubeflow.org/v1) fields we emit, as the CRD nests them
K8S_SCHEMA = {"apiVersion": str, "kind": str, "metadata": {"name": str, "namespace": str, "labels": dict},
              "spec": {"elasticPolicy": {"rdzvBackend": str, "rdzvHost": str, "rdzvPort": int, "rdzvId": str,
                                         "minReplicas": int, "maxReplicas": int, "maxRestarts": int},
                       "nprocPerNode": str,
                       "pytorchReplicaSpecs": {"Worker": {"replicas": int, "restartPolicy": str,
                                                          "template": {"spec": dict}}}}}
CONTAINER_KEYS = {"name", "image", "imagePullPolicy", "workingDir", "command", "env", "resources", "volumeMounts"}


def check_schema(doc, schema, path="") -> None:
    if isinstance(schema, dict):
        assert isinstance(doc, dict), path
        assert set(doc) <= set(schema), f"{path}: unexpected {set(doc) - set(schema)}"
        for k, sub in schema.items():
            assert k in doc, f"{path}.{k} missing"
            check_schema(doc[k], sub, f"{path}.{k}")
    else:
        assert isinstance(doc, schema), f"{path}: {doc!r} is not {schema.__name__}"


@pytest.mark.parametrize("name", CLUSTERS)
def test_kubernetes_manifests_match_pytorchjob_schema(rendered, name):
    for s in STAGES:
        spec, d = rendered[(name, s, "k8s")]
        job = yaml.safe_load((d / "pytorchjob.yaml").read_text())
        check_schema(job, K8S_SCHEMA)
        assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
        ep = job["spec"]["elasticPolicy"]
        assert (ep["minReplicas"], ep["maxReplicas"]) == spec.cluster.node_range
        worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
        assert worker["restartPolicy"] in ("OnFailure", "Never", "Always", "ExitCode")
        (c,) = worker["template"]["spec"]["containers"]
        assert set(c) <= CONTAINER_KEYS and c["name"] == "pytorch"
        limits = c["resources"]["limits"]
        acc = spec.cluster.accelerator
        if acc == "cuda":
            assert limits["nvidia.com/gpu"] == spec.cluster.devices_per_node
        if acc == "npu":
            assert limits["huawei.com/Ascend910"] == spec.cluster.devices_per_node
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and "HCCL_CONNECT_TIMEOUT" in env
        parse_torchrun(c["command"][3:])


def test_stage4_layout_is_data_parallel_as_the_reference_unless_sp_is_asked_for():
    spec = plan_launch(4, cluster("h100-slurm.yaml"))
    assert (spec.layout.world_size, spec.layout.tp, spec.layout.sp, spec.layout.dp) == (32, 1, 1, 32)
    spec = plan_launch(4, cluster("h100-slurm.yaml"), overrides=["--parallel.sequence_parallel=8"])
    assert (spec.layout.world_size, spec.layout.tp, spec.layout.sp, spec.layout.dp) == (32, 1, 8, 4)


def test_auto_sequence_parallel_fits_the_token_budget():
    spec = plan_launch(4, cluster("single-gpu-node.yaml"), cluster_overrides=["--sequence_parallel=auto",
                                                                             "--tokens_per_device=10000"])
    assert spec.layout.sp == 4 and -(-spec.layout.tokens // 4) <= 10000  # 32160 tokens, 32 heads


def test_tp_larger_than_a_node_is_refused_naming_stage_and_numbers():
    with pytest.raises(ConfigError, match=r"stage2: parallel.tensor_parallel=16 exceeds devices_per_node=8"):
        plan_launch(2, cluster("h100-slurm.yaml"), cluster_overrides=["--tensor_parallel=16"])


def test_sp_not_dividing_heads_is_refused_naming_stage_and_numbers():
    with pytest.raises(ConfigError, match=r"stage4: parallel.sequence_parallel=8 does not divide "
                                          r"model.num_heads=4.*32 devices"):
        plan_launch(4, cluster("h100-slurm.yaml"), overrides=["--model.preset=debug",
                                                              "--parallel.sequence_parallel=8"])


def test_elastic_range_is_checked_at_every_size(tmp_path):
    res = subprocess.run([sys.executable, "-m", "orchestration.cli", "launch", "--stage", "4", "--cluster",
                          cluster("single-gpu-node.yaml"), "--target", "torchrun", "--out", str(tmp_path),
                          "--cluster.devices_per_node=4", "--cluster.elastic.max_nodes=3",
                          "--parallel.sequence_parallel=8"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and not list(tmp_path.iterdir())
    assert "stage4" in res.stderr and "sequence_parallel=8 does not divide world size 4" in res.stderr


def _env(meta: dict) -> dict:
    env = {**os.environ, **meta["env"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("VGPT_FAULT_KILL", None)
    return env


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]


def test_rendered_torchrun_runs_stage1_on_one_node_two_processes(tmp_path):
    out = tmp_path / "run"
    spec = plan_launch(1, cluster("local-cpu.yaml"), overrides=[*TINY, f"--train.out_dir={out}"],
                       cluster_overrides=[f"--rendezvous.port={free_port()}"])
    render(spec, "torchrun", tmp_path / "launch")
    meta = json.loads((tmp_path / "launch" / "launch.json").read_text())
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", *meta["torchrun_argv"]], env=_env(meta),
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _steps(out) == [1, 2, 3]


def test_two_simulated_nodes_rendezvous_on_loopback(tmp_path):
    out = tmp_path / "run"
    spec = plan_launch(1, cluster("local-cpu.yaml"), overrides=[*TINY, f"--train.out_dir={out}"],
                       cluster_overrides=["--nodes=2", "--devices_per_node=1", "--rendezvous.host=127.0.0.1",
                                          f"--rendezvous.port={free_port()}"])
    render(spec, "torchrun", tmp_path / "launch")
    meta = json.loads((tmp_path / "launch" / "launch.json").read_text())
    assert "--nnodes=2" in meta["torchrun_argv"] and "--nproc-per-node=1" in meta["torchrun_argv"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *meta["torchrun_argv"]]
    agents = [subprocess.Popen(cmd, env=_env(meta), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    try:
        logs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    assert _steps(out) == [1, 2, 3]
