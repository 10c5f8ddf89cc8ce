"""A rank that fails under torchrun is named with its exception, not only an exit code.

`python -m orchestration.cli` (what torchrun runs) is wrapped in torch elastic's `@record`, so the
failing rank writes its exception and traceback to its TORCHELASTIC_ERROR_FILE; torchrun's agent
copies the first failure into its own error file and prints it as the root cause. A real
2-process torchrun on 127.0.0.1 running `vgpt train` (the debug model, gloo), exactly the command
`vgpt train --nproc 2` spawns, where rank 1 raises after its first step (VGPT_FAULT_RAISE,
orchestration/faults.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from tests.runs import TORCHRUN_ENV, env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_rank_failure_under_torchrun_writes_an_error_file_naming_the_exception(tmp_path):
    error_file = tmp_path / "torchrun_error.json"
    torchrun_env = env({"VGPT_FAULT_RAISE": "1:1", "TORCHELASTIC_ERROR_FILE": str(error_file)}, unset=TORCHRUN_ENV)
    torchrun = [sys.executable, "-m", "orchestration.launch.local_torchrun", "torch.distributed.run",
                "--local-addr=127.0.0.1", "--nproc-per-node=2", "--nnodes=1", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "--max-restarts=0"]
    res = subprocess.run([*torchrun, "-m", "orchestration.cli", "train", "--config", "configs/debug.yaml",
                          "--train.steps=2", "--train.log_every=1", "--train.tensorboard=false",
                          "--parallel.precision=fp32", "--parallel.zero_stage=0", f"--train.out_dir={tmp_path / 'run'}"],
                         cwd=REPO, env=torchrun_env, capture_output=True, text=True, timeout=300)
    log = res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 1, log
    assert error_file.is_file(), f"torchrun wrote no error file\n{log}"
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == "RuntimeError: VGPT_FAULT_RAISE: rank 1 fails after step 1", message
    # the traceback reaches the raise in the fault hook, through the trainer's step loop
    assert "raise RuntimeError" in message["extraInfo"]["py_callstack"] and "trainer.py" in \
        message["extraInfo"]["py_callstack"]
    # torchrun's summary names the rank and the exception as the root cause
    assert "rank      : 1 (local_rank: 1)" in res.stderr or "rank: 1" in res.stderr, log
    assert "RuntimeError: VGPT_FAULT_RAISE" in res.stderr, log


def test_bad_input_under_torchrun_stays_one_line_and_exit_2_and_reaches_the_error_file(tmp_path):
    """With the error file torchrun gives every rank, a ConfigError is still `vgpt <verb>: ...` and
    exit status 2, and the error file names it too (torchrun's summary would show `<N/A>` otherwise)."""
    error_file = tmp_path / "error.json"
    res = subprocess.run([sys.executable, "-m", "orchestration.cli", "config", "--config", "configs/debug.yaml",
                          "--train.steps=many"], cwd=REPO, capture_output=True, text=True,
                         env=env({"TORCHELASTIC_ERROR_FILE": str(error_file)}))
    line = "train.steps: got 'many', expected an integer (from the command line: --train.steps)"
    assert res.returncode == 2 and res.stderr.strip() == f"vgpt config: {line}", res.stderr
    assert json.loads(error_file.read_text())["message"]["message"] == f"ConfigError: {line}"


def test_a_rank_that_only_lost_its_peer_is_never_named_the_root_cause(tmp_path, monkeypatch):
    """torchrun names the failure with the smallest whole-second timestamp, ties to the lowest rank.
    Rank 0's collective fails the moment rank 1 dies, mostly within the same second (seen in CI:
    torchrun then named rank 0's "Connection closed by peer"). Both error files written here, in
    the same second, as the ranks' `@record` writes them; torch's own ChildFailedError chooses."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from orchestration.launch.root_cause import RootCauseErrorHandler, is_peer_loss

    def fail(rank: int, error: Exception) -> ProcessFailure:
        path = tmp_path / f"error_{rank}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
        try:
            raise error
        except Exception as e:
            RootCauseErrorHandler().record_exception(e)
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1, error_file=str(path))

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2228. This is "
                        "typically caused by a remote worker crashing.")
    assert is_peer_loss(gloo) and not is_peer_loss(RuntimeError("CUDA out of memory"))
    real = fail(1, RuntimeError("VGPT_FAULT_RAISE: rank 1 fails after step 1"))
    lost = fail(0, gloo)  # written after the real one, as the loss follows the failure
    assert lost.timestamp > real.timestamp
    rank, first = ChildFailedError("vgpt", {0: lost, 1: real}).get_first_failure()
    assert rank == 1 and first.message["message"] == "RuntimeError: VGPT_FAULT_RAISE: rank 1 fails after step 1"
    # the consequence says it is one
    assert json.loads((tmp_path / "error_0.json").read_text())["message"]["extraInfo"]["peer_failure"] is True
    # any other failure is recorded as torch records it
    assert "peer_failure" not in json.loads((tmp_path / "error_1.json").read_text())["message"]["extraInfo"]
