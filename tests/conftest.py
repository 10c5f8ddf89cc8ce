"""Shared fixtures: an S3 server on loopback (moto, as s3fs's own tests do), a sandbox with no S3
credentials, the training runs several files read (trained once per session), the order of the tests
(the quick tier first) and the session's long jobs in the background (tests/runs.py)."""
from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest
import torch

from orchestration.launch.plan import plan_launch, render
from orchestration.preflight import ASSUME_S3, S3_ENV
from tests.runs import (AWS, BACKGROUND, EARLY, LAUNCH_TINY, ONE_RANK, PLAN_REFUSED, REPO, TINY, TWO_RANK_ZERO2, env,
                        train)
from tests.offload import durations_line, offload, offloadable
from tests.sockets import run_watching_sockets

# One intra-op thread in the test process, as in every process the tests start (tests/runs.py env):
# beside a background job or a 2-rank run, a pool of one OpenMP thread per core spins on a core that
# another process holds, and every parallel region waits for it.
torch.set_num_threads(1)
# a watched run must pick the loopback interface itself, not inherit it from this environment
CHOOSES_LOOPBACK = ("GLOO_SOCKET_IFNAME",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Dummy credentials via env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields (s3fs filesystem, storage_options, bucket name)."""
    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_server}, "use_listings_cache": False}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, opts, bucket
    fs.rm(bucket, recursive=True)


@pytest.fixture
def no_s3_credentials(tmp_path, monkeypatch):
    """cwd is the tmp dir (relative default paths land there) and no AWS credentials are anywhere the
    preflight looks (orchestration/preflight.py S3_ENV; its shared-credentials file does not exist)."""
    monkeypatch.chdir(tmp_path)
    for k in (*S3_ENV, ASSUME_S3):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return tmp_path


# ---------------------------------------------------------------- training runs shared by several files
@pytest.fixture(scope="session")
def one_rank_run(tmp_path_factory):
    """One process, 10 steps, checkpoints at 5 and 10, fake AWS credentials in its environment (tests/runs.py
    ONE_RANK): the run that test_fail_loudly_ckpt, test_checkpoint, test_checkpoint_s3 and test_secrets
    read. Read-only: copy it (runs.copy_run) to change it."""
    out = tmp_path_factory.mktemp("one_rank_run")
    train(out, *ONE_RANK, *PLAN_REFUSED, "--plan.ignore=true", env_extra=AWS)  # the plan's override starts
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000010"]
    return out


@pytest.fixture(scope="session")
def two_rank_zero2_watched(tmp_path_factory):
    """(run dir, every address its process tree listened on): 2 ranks x 1 row under ZeRO-2 through
    `vgpt train --nproc 2` (the loopback torchrun), 20 steps, a checkpoint every 5 (tests/runs.py
    TWO_RANK_ZERO2), its sockets polled while it ran. Read-only."""
    out = tmp_path_factory.mktemp("two_rank_zero2")
    rc, log, seen = run_watching_sockets([sys.executable, "-m", "orchestration.cli", "train", *TINY,
                                          f"--train.out_dir={out}", *TWO_RANK_ZERO2], env(unset=CHOOSES_LOOPBACK))
    assert rc == 0, log[-3000:]
    return out, seen


@pytest.fixture(scope="session")
def two_rank_zero2(two_rank_zero2_watched):
    """The run of `two_rank_zero2_watched`: the reference of test_trainer's ZeRO-2 tests and of
    test_checkpoint_layout."""
    return two_rank_zero2_watched[0]


@pytest.fixture(scope="session")
def rendered_torchrun(tmp_path_factory):
    """The torchrun launch of stage 1 rendered for the local-cpu cluster (1 node x 2 processes), run as
    written (`bash torchrun.sh`) with its sockets polled: test_launch checks that it trains, test_loopback
    that it listened on loopback only. Returns (launch.json, run dir, exit code, output, addresses seen)."""
    tmp = tmp_path_factory.mktemp("rendered_torchrun")
    out = tmp / "run"
    spec = plan_launch(1, str(REPO / "configs/cluster/local-cpu.yaml"),
                       overrides=[*LAUNCH_TINY, f"--train.out_dir={out}"],
                       cluster_overrides=[f"--rendezvous.port={free_port()}", f"--python={sys.executable}",
                                          f"--workdir={REPO}"])
    render(spec, "torchrun", tmp / "launch")
    meta = json.loads((tmp / "launch" / "launch.json").read_text())
    rc, log, seen = run_watching_sockets(["bash", str(tmp / "launch" / "torchrun.sh")], env(unset=CHOOSES_LOOPBACK))
    return meta, out, rc, log, seen


# ---------------------------------------------------------------- order, and the long jobs in the background
@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: these are the tests that will run
def pytest_collection_modifyitems(session, config, items):
    """The quick tier first (a failure there shows in the first minute), then the slow tests, each in
    collection order; the session's long jobs start now, in a thread beside them (tests/runs.py
    Background): `bench/gpu.py --tiny`, the real growth job, the quickstart's first run, the example
    sweep's killed-and-resumed run, and last the slow tests of tests/offload.py's files (the
    precompute farm's, sequence parallelism's) in a pytest process of their own, whose stand-ins end
    the session. Where the precompute tests run in this process (a file run alone), their Ray head
    is set up beside the tests before them (tests/runs.py EARLY)."""
    items[:] = [i for i in items if i.get_closest_marker("slow") is None] + \
               [i for i in items if i.get_closest_marker("slow") is not None]
    if config.option.collectonly:
        return
    factory = config._tmp_path_factory  # what the tmp_path_factory fixture hands out
    offloaded = offloadable(items)
    files = {Path(str(i.fspath)).name for i in items if i not in offloaded}
    if "test_bench_gpu.py" in files:  # first: its test comes early in the slow tier
        from test_bench_gpu import bench_gpu_tiny

        folder = factory.mktemp("bench_gpu")
        BACKGROUND.add("bench_gpu", lambda: bench_gpu_tiny(folder, run=BACKGROUND.run))
    if any(i.name == "test_real_job_over_more_videos_encodes_only_the_new_ones" for i in items):
        from test_dataset_growth import grow_real_job

        grown = factory.mktemp("growth_real_job")
        BACKGROUND.add("growth_real_job", lambda: grow_real_job(grown, run=BACKGROUND.run))
    if "test_quickstart.py" in files:
        from test_quickstart import quickstart

        workdir = factory.mktemp("quickstart")
        BACKGROUND.add("quickstart", lambda: (workdir, quickstart(workdir, run=BACKGROUND.run)))
    if any("full_sweep" in getattr(i, "fixturenames", ()) for i in items):
        from test_sweep import killed_and_resumed_sweep

        out = factory.mktemp("sweep") / "full"
        BACKGROUND.add("sweep", lambda: killed_and_resumed_sweep(out, run=BACKGROUND.run))
    items[:] = offload(items, offloaded, factory)  # queued last: the lane's other jobs feed tests before
    BACKGROUND.start()
    if "test_precompute_job.py" in files:  # its Ray head and input videos, set up beside the quick tier
        from test_precompute_job import precompute_env

        pc = factory.mktemp("pc")
        EARLY.begin("precompute", lambda: precompute_env(pc), undo=lambda made: made["head"].stop())


def pytest_sessionfinish(session, exitstatus):
    BACKGROUND.stop()
    EARLY.close()


def pytest_terminal_summary(terminalreporter):
    line = durations_line()
    if line:
        terminalreporter.write_line(line)
