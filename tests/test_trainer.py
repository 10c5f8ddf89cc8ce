"""The DeepSpeed Trainer on CPU with gloo, real engine, 2 processes (torchrun).

Parity: ZeRO-1/2/3 on 2 ranks (1 row each) give the losses and final weights of
one process on the same global batch (2 rows). Resume: a run killed after step
12 with a checkpoint at step 10 resumes and reproduces steps 11-20 bitwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.export import read_export_tensors
from tests.runs import TINY, TWO_RANK_STEPS, TWO_RANK_ZERO2, cli, vgpt

STEPS = TWO_RANK_STEPS
COMMON = [*TINY, f"--train.steps={STEPS}", "--train.log_every=10"]


def vgpt_train(out: Path, nproc: int, *extra: str):
    res = vgpt("train", *COMMON, f"--train.out_dir={out}", f"--nproc={nproc}", *extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(out: Path) -> dict[int, float]:
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        by_step[m["step"]] = m["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return by_step


def weights(out: Path) -> dict[str, torch.Tensor]:
    return read_export_tensors(out / "export")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    vgpt_train(out, 1, "--train.batch_size=2", "--parallel.zero_stage=0")
    return out


@pytest.fixture
def zero2(two_rank_zero2):
    """The shared 2-rank ZeRO-2 run (tests/conftest.py; tests/runs.py TWO_RANK_ZERO2)."""
    return two_rank_zero2


def assert_parity(run: Path, reference: Path):
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    w_run, w_ref = weights(run), weights(reference)
    assert w_run.keys() == w_ref.keys()
    for k in w_ref:
        torch.testing.assert_close(w_run[k], w_ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_zero2_two_ranks_match_one_process(zero2, reference):
    assert_parity(zero2, reference)
    first, last = losses(zero2)[1], losses(zero2)[STEPS]
    assert last < first  # and it trains


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_two_ranks_match_one_process(stage, reference, tmp_path):
    vgpt_train(tmp_path, 2, "--train.batch_size=1", f"--parallel.zero_stage={stage}")
    assert_parity(tmp_path, reference)


@pytest.mark.slow
def test_killed_run_resumes_bitwise(zero2, tmp_path):
    killed = vgpt("train", *TINY, *TWO_RANK_ZERO2, f"--train.out_dir={tmp_path}",
                  env_extra={"VGPT_FAULT_KILL": "1:12"})
    assert killed.returncode != 0
    assert not (tmp_path / "export").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000010"
    res = vgpt("train", *TINY, *TWO_RANK_ZERO2, f"--train.out_dir={tmp_path}", "--resume=auto")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed, uninterrupted = losses(tmp_path), losses(zero2)
    for step in range(11, STEPS + 1):
        assert resumed[step] == uninterrupted[step], f"step {step}: {resumed[step]} != {uninterrupted[step]}"
    w_a, w_b = weights(tmp_path), weights(zero2)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_b)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=2"])
def test_tp_and_sp_runs_match_one_process(layout, reference, tmp_path):
    """TP=2 or SP=2 on 2 ranks is one data-parallel replica holding the whole global batch."""
    vgpt_train(tmp_path, 2, "--train.batch_size=2", "--parallel.zero_stage=1", layout)
    assert_parity(tmp_path, reference)


@pytest.mark.parametrize("override, message", [
    ("--parallel.tensor_parallel=3", "parallel.tensor_parallel=3 x parallel.sequence_parallel=1 does not divide "
                                     "world size 2"),
    ("--parallel.sequence_parallel=8", "parallel.tensor_parallel=1 x parallel.sequence_parallel=8 does not divide"),
    ("--parallel.zero_stage=4", "parallel.zero_stage: got 4, expected one of [0, 1, 2, 3]"),
])
def test_bad_layouts_fail_before_any_process_starts(override, message, tmp_path):
    res = cli("train", *COMMON, f"--train.out_dir={tmp_path / 'run'}", "--nproc=2", override)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr
    assert "torch.distributed" not in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gradient_accumulation_matches_the_larger_batch(reference, tmp_path):
    """2 micro steps of 1 row under ZeRO-2 = 1 step of 2 rows: same losses, same weights."""
    vgpt_train(tmp_path, 1, "--train.batch_size=1", "--train.grad_accum_steps=2", "--parallel.zero_stage=2")
    assert_parity(tmp_path, reference)
