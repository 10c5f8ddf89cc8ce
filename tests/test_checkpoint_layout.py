"""Runs that survive a change of parallel layout: a checkpoint written by one
world size / TP size / ZeRO stage resumes on another (automatically, every rank
reading its part of the saved fragments, or after `vgpt ckpt reshard`), and
`vgpt ckpt export` merges ZeRO-3 partitions and TP shards offline. CPU, gloo,
the real DeepSpeed engine, 2 or 3 processes via torchrun.

Every run trains the same global batch (2 rows per step: 2 ranks x 1 row, or
1 rank x 2 rows, or one TP=2 replica x 2 rows), so an uninterrupted 2-rank run
is the reference for all of them; but 3 ranks cannot train 2 rows a step, so
the 2 -> 3 resume trains 3 rows (3 ranks x 1 row) and its reference is the
2 -> 1 resume of the same checkpoint with 3 rows (the kill test's restart).

Tolerance: after a layout change the losses match the uninterrupted run to
rel 1e-5 (abs 1e-6) and the final weights to rtol 1e-4 / atol 1e-6, the bounds
of the ZeRO parity tests (test_trainer.py). Bitwise equality is not expected:
another number of ranks sums the gradients in another order (measured here:
~1e-7 relative). Resuming without the Adam moments moves the losses by ~1e-1,
four orders of magnitude outside the bound.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pretrain.checkpoint.export import read_export_tensors
from tests.runs import REPO, TINY, TWO_RANK_STEPS, cli, env, rows_by_step, vgpt

pytestmark = pytest.mark.slow  # every test here trains through DeepSpeed or reads such a run

STEPS = TWO_RANK_STEPS
BASE = [*TINY, f"--train.steps={STEPS}", "--train.log_every=10"]
TWO_RANKS = ["--nproc=2", "--train.batch_size=1"]
ONE_RANK = ["--train.batch_size=2"]
RESHARDED = "every rank reads its part of the saved fragments"  # the log line of a resume on another layout


def train(out: Path, *args: str) -> str:
    res = vgpt("train", *BASE, f"--train.out_dir={out}", *args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def losses(out: Path) -> dict[int, float]:
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()}


def export(out: Path) -> dict[str, torch.Tensor]:
    return read_export_tensors(out / "export")


def assert_matches(run: Path, reference: Path, first_step: int) -> None:
    got, want = losses(run), losses(reference)
    assert sorted(s for s in got if s >= first_step) == list(range(first_step, STEPS + 1))
    for step in range(first_step, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    # the same global rows at every step: no sample repeated or skipped across the change
    rows, ref_rows = rows_by_step(run), rows_by_step(reference)
    assert all(rows[s] == ref_rows[s] for s in range(first_step, STEPS + 1))
    a, b = export(run), export(reference)
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def start_from(checkpoint: Path, out: Path) -> Path:
    """A fresh run directory holding one copied checkpoint (and nothing newer)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    return out


@pytest.fixture(scope="module")
def uninterrupted(two_rank_zero2):
    """2 ranks x 1 row, ZeRO-2, a checkpoint every 5 steps: the shared run (tests/conftest.py)."""
    return two_rank_zero2


@pytest.fixture(scope="module")
def resumed_on_one_rank(uninterrupted, tmp_path_factory):
    """The 2-rank ZeRO-2 checkpoint of step 10, resumed by 1 rank (checkpoints at 15 and 20)."""
    out = start_from(uninterrupted / "checkpoints" / "step_00000010", tmp_path_factory.mktemp("one_rank"))
    stdout = train(out, *ONE_RANK, "--parallel.zero_stage=2", "--train.checkpoint_every=5")
    return out, stdout


def test_two_rank_checkpoint_resumes_on_one_rank(resumed_on_one_rank, uninterrupted):
    out, stdout = resumed_on_one_rank
    assert "PARALLEL LAYOUT CHANGED" in stdout and "ZeRO partitions (dp x sp) 2 -> 1" in stdout
    assert RESHARDED in stdout and "step_00000010 at step 10" in stdout
    assert_matches(out, uninterrupted, first_step=11)
    # nothing but checkpoints: no converted copy was written, not even for a while
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000010", "step_00000015",
                                                                       "step_00000020"]
    st = json.loads((out / "checkpoints" / "step_00000015" / "trainer_state.json").read_text())
    assert st["layout"]["dp"] == 1 and st["layout"]["format"] == "sharded"  # new saves: the new layout


def test_one_rank_checkpoint_resharded_resumes_on_two_ranks(resumed_on_one_rank, uninterrupted, tmp_path):
    src, _ = resumed_on_one_rank
    res = cli("ckpt", "reshard", str(src), "--step", "15", "--dp", "2", "--out", str(tmp_path / "checkpoints"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("ckpt", "verify", str(tmp_path))
    assert res.returncode == 0 and "step_00000015: ok" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "portable" in cli("ckpt", "list", str(tmp_path)).stdout
    stdout = train(tmp_path, *TWO_RANKS, "--parallel.zero_stage=2")
    assert "loading portable checkpoint" in stdout and "step_00000015 at step 15" in stdout
    assert_matches(tmp_path, uninterrupted, first_step=16)


def test_reshard_refuses_a_layout_the_model_cannot_split(uninterrupted, tmp_path):
    res = cli("ckpt", "reshard", str(uninterrupted), "--dp", "1", "--tp", "3", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "parallel.tensor_parallel=3 does not divide model.num_heads=4" in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def zero3_tp2(tmp_path_factory):
    """2 processes, TP=2 x ZeRO-3 (dp=1), 10 steps, checkpoint at the end."""
    out = tmp_path_factory.mktemp("zero3_tp2")
    train(out, "--nproc=2", "--train.batch_size=2", "--parallel.zero_stage=3", "--parallel.tensor_parallel=2",
          f"--train.steps={STEPS // 2}")
    return out


def test_zero3_tp2_export_equals_the_live_model(zero3_tp2, tmp_path):
    ckpt = zero3_tp2 / "checkpoints" / "step_00000010"
    assert (ckpt / "model-tp01.safetensors").is_file() and (ckpt / "rank-00001.safetensors").is_file()  # TP rank 1
    out = tmp_path / "exported.safetensors"
    res = cli("ckpt", "export", str(zero3_tp2), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    with safe_open(str(out), framework="pt") as f:  # safetensors alone: no torch.load, no DeepSpeed
        got = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["model_config"])["num_heads"] == 4
    live = export(zero3_tp2)  # gathered from the live engine at the end of the run (ZeRO-3 + TP gather)
    assert got.keys() == live.keys()
    assert got["backbone.layers.0.self_attn.qkv_proj.weight"].shape == (192, 64)
    assert all(torch.equal(got[k], live[k]) for k in live)


def test_zero3_tp2_checkpoint_resumes_on_one_rank_zero2(zero3_tp2, uninterrupted, tmp_path):
    """TP shards, ZeRO-3 partitions and their Adam moments merged, then re-partitioned for ZeRO-2."""
    tp_losses, ref = losses(zero3_tp2), losses(uninterrupted)
    for step in range(1, STEPS // 2 + 1):  # the TP run itself follows the reference
        assert tp_losses[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}"
    out = start_from(zero3_tp2 / "checkpoints" / "step_00000010", tmp_path)
    stdout = train(out, *ONE_RANK, "--parallel.zero_stage=2")
    assert "PARALLEL LAYOUT CHANGED" in stdout and "tp 2 -> 1" in stdout and "zero_stage 3 -> 2" in stdout
    assert RESHARDED in stdout
    assert_matches(out, uninterrupted, first_step=11)


def test_zero3_tp2_checkpoint_resumes_on_the_same_layout(zero3_tp2, uninterrupted, tmp_path):
    """Each rank reads back only its own files (sharded.py load_sharded): its ZeRO-3 module partition,
    fp32 master and moments, its TP rank's module file, straight into the engine's tensors."""
    out = start_from(zero3_tp2 / "checkpoints" / "step_00000010", tmp_path)
    stdout = train(out, "--nproc=2", "--train.batch_size=2", "--parallel.zero_stage=3",
                   "--parallel.tensor_parallel=2")
    assert "PARALLEL LAYOUT CHANGED" not in stdout and RESHARDED not in stdout
    assert_matches(out, uninterrupted, first_step=11)


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def resumed_on_three_ranks(uninterrupted, tmp_path_factory):
    """The 2-rank ZeRO-2 checkpoint of step 10 resumed by 3 ranks x 1 row, 2 steps (to step 12)."""
    out = start_from(uninterrupted / "checkpoints" / "step_00000010", tmp_path_factory.mktemp("three_ranks"))
    res = vgpt("train", *TINY, f"--train.out_dir={out}", "--train.steps=12", "--nproc=3", "--train.batch_size=1",
               "--parallel.zero_stage=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout


def test_two_rank_checkpoint_resumes_on_three_ranks(resumed_on_three_ranks):
    out, stdout = resumed_on_three_ranks
    assert "PARALLEL LAYOUT CHANGED" in stdout and "ZeRO partitions (dp x sp) 2 -> 3" in stdout and RESHARDED in stdout
    assert sorted(losses(out)) == [11, 12]  # its losses: compared in the kill test below
    st = json.loads((out / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert st["layout"]["dp"] == 3 and (out / "checkpoints" / "step_00000012" / "rank-00002.safetensors").is_file()


def test_sigkill_during_a_resharded_resume_leaves_the_checkpoint_untouched(resumed_on_three_ranks, uninterrupted,
                                                                          tmp_path):
    """A resume of the 2-rank checkpoint on 1 rank x 3 rows, SIGKILLed at its first, middle and last read
    (tests/reshard_kill_harness.py): not a byte of the checkpoint changes, nothing is left beside it, and
    the restart's losses equal the 3-rank resume's (the same 3 rows a step)."""
    run = start_from(uninterrupted / "checkpoints" / "step_00000010", tmp_path / "run")
    before = checksums(run / "checkpoints")
    res = subprocess.run([sys.executable, str(REPO / "tests/reshard_kill_harness.py"), str(run), "3", "2"],
                         capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["reads"] > 3 and [k["point"] for k in got["kills"]] == [1, got["reads"] // 2, got["reads"]]
    assert all(k["killed"] for k in got["kills"]), got["kills"]
    assert checksums(run / "checkpoints") == before and got["chosen"] == "step_00000010"
    three = losses(resumed_on_three_ranks[0])
    for step in (11, 12):
        assert got["losses"][str(step)] == pytest.approx(three[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_ranged_reads_fill_a_device_tensor_through_a_host_buffer(tmp_path):
    """A resharded resume reads straight into the engine's state; on a GPU that state is a device tensor,
    which pread cannot fill (it needs host memory). `meta` stands in for the device here (no GPU in CI):
    the read goes through one host buffer, where reading into it directly raised."""
    from pretrain.checkpoint.fragment_reader import ByteRanges
    path = tmp_path / "bytes"
    path.write_bytes(bytes(range(16)))
    src = ByteRanges()
    host = src.read_into(str(path), 4, torch.empty(8, dtype=torch.uint8))
    assert host.tolist() == list(range(4, 12))
    device = src.read_into(str(path), 4, torch.empty(8, dtype=torch.uint8, device="meta"))
    assert device.device.type == "meta" and (src.count, src.bytes) == (2, 16)
    src.close()
