"""`vgpt launch`: rendered launch files are valid for every example cluster and stage (the
Kubernetes ones against the Kubeflow CRDs' published schemas, tests/data/kubeflow/), they take
the rendezvous from MASTER_ADDR/MASTER_PORT, impossible layouts fail naming the stage and
numbers, and the rendered torchrun commands really train (1 node x 2 processes; 2 simulated
nodes on loopback)."""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import free_port
from torch.distributed.run import get_args_parser

from jobconfig.errors import ConfigError
from orchestration.launch.plan import plan_launch, render
from orchestration.launch.targets import TARGETS
from tests.runs import LAUNCH_TINY as TINY

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = sorted(p.name for p in (REPO / "configs/cluster").glob("*.yaml"))
STAGES = (1, 2, 3, 4)


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
        # the script runs exactly that argv, its rendezvous endpoint taken from MASTER_ADDR/MASTER_PORT
        line = (d / "torchrun.sh").read_text().strip().splitlines()[-1]
        words = shlex.split(line)
        endpoint = "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}"
        assert words[words.index("torch.distributed.run") + 1:] == [
            endpoint if a.startswith("--rdzv-endpoint=") else a for a in meta["torchrun_argv"]]
        assert meta["rendezvous"] == {"MASTER_ADDR": spec.cluster.rendezvous.host or None,
                                      "MASTER_PORT": spec.cluster.rendezvous.port}


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
        assert args.nnodes == str(spec.cluster.nodes) and args.rdzv_endpoint == "${MASTER_ADDR}:${MASTER_PORT}"
        assert 'MASTER_PORT="${MASTER_PORT:-' in text
        _, d = rendered[(name, s, "deepspeed")]
        hosts = (d / "hostfile").read_text().splitlines()
        assert len(hosts) == spec.cluster.nodes and all(h.endswith(f"slots={spec.cluster.devices_per_node}")
                                                       for h in hosts)
        ds = ds_parse(json.loads((d / "deepspeed.json").read_text())["deepspeed_argv"])
        assert ds.module and ds.user_script == "orchestration.cli" and ds.user_args[0] == "train"
        ds_words = shlex.split((d / "deepspeed.sh").read_text().strip().splitlines()[-1])
        assert ds_words[ds_words.index("--master_addr") + 1:ds_words.index("--master_port") + 2] == \
            ["${MASTER_ADDR}", "--master_port", "${MASTER_PORT}"]
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
        # CI installs it (scripts/install.sh fails there without it): a missing linter must not pass as a skip
        assert not os.environ.get("CI"), "shellcheck is not on PATH in CI; scripts/install.sh should have installed it"
        pytest.skip("shellcheck not on PATH (`bash scripts/install.sh --with-system-tools` installs it)")
    scripts = sorted(str(f) for _, d in rendered.values() for f in d.glob("*.sh"))
    res = subprocess.run(["shellcheck", "-s", "bash", *scripts], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:]


CRDS = REPO / "tests/data/kubeflow"
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


@functools.lru_cache(maxsize=None)
def crd_validator(file: str) -> jsonschema.protocols.Validator:
    """The CRD's published openAPIV3Schema (a structural JSON schema) as a validator."""
    crd = yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def check_against(validator, doc: dict, where) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{where}: " + "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                                                for e in errors[:5])


def test_schema_check_rejects_what_the_crd_rejects():
    """The vendored schemas do bite: a wrong type, an unknown enum value, a missing required field."""
    trainjob, pytorchjob = crd_validator("trainer.kubeflow.org_trainjobs.yaml"), crd_validator(
        "kubeflow.org_pytorchjobs.yaml")
    assert not trainjob.is_valid({"spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": "2"}}})
    assert not trainjob.is_valid({"spec": {"trainer": {"numNodes": 2}}})            # runtimeRef is required
    assert trainjob.is_valid({"spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}}})
    assert not pytorchjob.is_valid({"spec": {"pytorchReplicaSpecs": {"Worker": {"replicas": "2"}}}})


@pytest.mark.parametrize("name", CLUSTERS)
def test_kubernetes_trainjob_validates_against_the_trainjob_crd(rendered, name):
    validator = crd_validator("trainer.kubeflow.org_trainjobs.yaml")
    for s in STAGES:
        spec, d = rendered[(name, s, "k8s")]
        job = yaml.safe_load((d / "trainjob.yaml").read_text())
        check_against(validator, job, d)
        assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
        assert re.match(DNS1123, job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
        trainer = job["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (spec.cluster.nodes, spec.cluster.devices_per_node)
        assert not {e["name"] for e in trainer["env"]} & {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK",
                                                           "PET_MASTER_ADDR", "PET_MASTER_PORT"}  # the runtime's
        limits = trainer["resourcesPerNode"]["limits"]
        if spec.cluster.accelerator == "cuda":
            assert limits["nvidia.com/gpu"] == spec.cluster.devices_per_node
        if spec.cluster.accelerator == "npu":
            assert limits["huawei.com/Ascend910"] == spec.cluster.devices_per_node
        # sh -c 'cd "$0" && exec "$@"' WORKDIR python -m orchestration.launch.local_torchrun torch.distributed.run
        # ...: nodes, procs and the master come from the runtime's PET_* variables, so torchrun's flags for
        # them are absent
        command = trainer["command"]
        assert command[:4] == ["sh", "-c", 'cd "$0" && exec "$@"', spec.cluster.workdir]
        assert command[5:8] == ["-m", "orchestration.launch.local_torchrun", "torch.distributed.run"]
        args = get_args_parser().parse_args(command[8:])
        assert args.module and args.training_script == "orchestration.cli"
        assert (args.nnodes, args.nproc_per_node, args.max_restarts) == ("1:1", "1", spec.cluster.elastic.max_restarts)
        assert "--nnodes" not in " ".join(trainer["command"]) and args.training_script_args[0] == "train"


def test_trainjob_command_enters_the_workdir_and_runs_the_argv_unchanged(tmp_path, rendered):
    spec, d = rendered[("k8s-gpu.yaml", 1, "k8s")]
    command = yaml.safe_load((d / "trainjob.yaml").read_text())["spec"]["trainer"]["command"]
    res = subprocess.run([*command[:3], str(tmp_path), sys.executable, "-c",
                          "import os, sys; print(os.getcwd(), sys.argv[1:])", "a b", "$x"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"{tmp_path} ['a b', '$x']"


@pytest.mark.parametrize("name", CLUSTERS)
def test_kubernetes_pytorchjob_validates_against_the_pytorchjob_crd(rendered, name):
    validator = crd_validator("kubeflow.org_pytorchjobs.yaml")
    for s in STAGES:
        spec, d = rendered[(name, s, "k8s-pytorchjob")]
        job = yaml.safe_load((d / "pytorchjob.yaml").read_text())
        check_against(validator, job, d)
        assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
        ep = job["spec"]["elasticPolicy"]
        assert (ep["minReplicas"], ep["maxReplicas"]) == spec.cluster.node_range
        (c,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
        if spec.cluster.accelerator == "npu":
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and "HCCL_CONNECT_TIMEOUT" in env
        assert c["command"][1:4] == ["-m", "orchestration.launch.local_torchrun", "torch.distributed.run"]
        parse_torchrun(c["command"][4:])


def test_torchrun_script_takes_the_rendezvous_from_master_addr_and_port(tmp_path):
    """torchrun.sh runs with `python` standing for the interpreter as `echo`, so the argv it would run
    is printed: MASTER_ADDR/MASTER_PORT when set; without a host anywhere it stops naming MASTER_ADDR."""
    spec = plan_launch(1, cluster("h100-slurm.yaml"), cluster_overrides=["--python=echo", f"--workdir={tmp_path}"])
    (script,) = [p for p in render(spec, "torchrun", tmp_path / "launch") if p.name == "torchrun.sh"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(["bash", str(script)], env={**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"},
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--rdzv-endpoint=10.1.2.3:1234" in res.stdout.split(), res.stderr
    res = subprocess.run(["bash", str(script)], env={**env, "MASTER_ADDR": "10.1.2.3"}, capture_output=True, text=True)
    assert "--rdzv-endpoint=10.1.2.3:29400" in res.stdout.split(), res.stderr
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "MASTER_ADDR" in res.stderr and not res.stdout
    # a one-node loopback cluster stays on loopback whatever MASTER_ADDR says; its port still follows MASTER_PORT
    spec = plan_launch(1, cluster("local-cpu.yaml"), cluster_overrides=["--python=echo", f"--workdir={tmp_path}"])
    (script,) = [p for p in render(spec, "torchrun", tmp_path / "local") if p.name == "torchrun.sh"]
    res = subprocess.run(["bash", str(script)], env={**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"},
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--rdzv-endpoint=127.0.0.1:1234" in res.stdout.split(), res.stderr


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


@pytest.mark.slow
def test_rendered_torchrun_runs_stage1_on_one_node_two_processes(rendered_torchrun):
    """The rendered torchrun.sh of the local-cpu cluster, run as written (tests/conftest.py)."""
    meta, out, returncode, log, _ = rendered_torchrun
    parse_torchrun(meta["torchrun_argv"])
    assert "--nproc-per-node=2" in meta["torchrun_argv"] and "--nnodes=1" in meta["torchrun_argv"]
    assert returncode == 0, log[-3000:]
    assert _steps(out) == [1, 2, 3]


@pytest.mark.slow
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


def test_a_blending_stage_reads_its_own_sources_not_the_cluster_dataset():
    spec = plan_launch(1, cluster("local-cpu.yaml"), config="configs/stages/stage2_blend.yaml")
    args = get_args_parser().parse_args(spec.torchrun_args("127.0.0.1"))
    assert not [a for a in args.training_script_args if a.startswith("--data.root")], args.training_script_args
    plain = plan_launch(1, cluster("local-cpu.yaml"), config="configs/stages/stage2.yaml")
    assert [a for a in get_args_parser().parse_args(plain.torchrun_args("127.0.0.1")).training_script_args
            if a.startswith("--data.root=")]
