"""Fail loudly, lose nothing: resume never starts over on top of a run whose checkpoints do not
verify, metrics.jsonl never holds a step twice, and every `vgpt ckpt` verb picks a checkpoint by
one rule (the newest that verifies, or `--step N` refused when broken). One real tiny run (CPU,
gloo, the DeepSpeed engine), shared with other files (tests/conftest.py), is copied for each test;
`vgpt ckpt` runs in process, `vgpt train` in its own."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.runs import ONE_RANK, TINY, TWO_RANK_ZERO2, cli, copy_run, vgpt

pytestmark = pytest.mark.slow  # every test here trains through DeepSpeed or reads such a run

BASE = TINY
STEPS = ONE_RANK


@pytest.fixture
def run(one_rank_run, tmp_path) -> Path:
    """A copy of the shared one-rank run (tests/conftest.py): 10 steps, checkpoints at 5 and 10."""
    return copy_run(one_rank_run, tmp_path / "run")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` and its sha256: what must not change."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps_of(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(res, rc: int, prefix: str) -> str:
    assert res.returncode == rc, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def biggest_shard(ckpt: Path) -> Path:
    return max((p for p in ckpt.iterdir() if p.name.endswith(".safetensors")), key=lambda p: p.stat().st_size)


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def test_resume_with_no_verifying_checkpoint_refuses_and_destroys_nothing(run):
    ckpts = run / "checkpoints"
    for manifest in ckpts.glob("step_*/manifest.json"):
        manifest.unlink()
    before = snapshot(run)
    # the default --resume auto: stop, naming every checkpoint and its problem
    # (refused by the preflight, before any process group: in process)
    line = one_line_error(cli("train", *BASE, f"--train.out_dir={run}"), 2, "vgpt train: ")
    assert "none of the 2 checkpoint(s)" in line and "step_00000005" in line and "step_00000010" in line
    assert "manifest.json: missing" in line and "--resume fresh" in line
    assert snapshot(run) == before
    # a fresh start into that out_dir is refused too
    line = one_line_error(cli("train", *BASE, f"--train.out_dir={run}", "--resume", "none"), 2, "vgpt train: ")
    assert "already holds checkpoints" in line and "--resume fresh" in line
    assert snapshot(run) == before
    # asked for explicitly, as every refusal above says: the old run is moved aside whole, and the new one
    # starts at step 1
    res = vgpt("train", *BASE, *STEPS, f"--train.out_dir={run}", "--resume", "fresh")
    assert res.returncode == 0, res.stderr[-3000:]
    (aside,) = run.glob("replaced-*")
    assert f"moved the earlier run (2 checkpoints, step_00000005..step_00000010) to {aside}" in res.stdout
    assert {k: v for k, v in snapshot(aside).items()} == {
        k: v for k, v in before.items() if k.split("/")[0] in ("checkpoints", "metrics.jsonl", "export")}
    assert steps_of(run) == list(range(1, 11))


def test_a_refusal_under_torchrun_ends_the_job_at_once_in_one_line(two_rank_zero2, tmp_path):
    """Every checkpoint bit-flipped, sizes intact: the preflight's size check passes, the ranks' re-hash
    refuses. The refusal ends the job with exit 2 and one line; none of the 3 restarts is spent on it."""
    run = copy_run(two_rank_zero2, tmp_path / "run")
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    for ckpt in ckpts:
        flip_bit(biggest_shard(ckpt))
    before = snapshot(run)
    # LOGLEVEL=INFO: the agent's own lines ("I<date> ...") say how often it started the workers
    res = vgpt("train", *TINY, *TWO_RANK_ZERO2, f"--train.out_dir={run}", "--max-restarts=3",
               env_extra={"LOGLEVEL": "INFO"})
    agent = [line for line in res.stderr.splitlines() if line[:1] in "IWE" and line[1:5].isdigit()]
    assert [line for line in agent if "starting workers for entrypoint" in line] and not [
        line for line in agent if "will restart worker group" in line], "\n".join(agent)
    assert not [line for line in agent if line[:1] in "WE"], "\n".join(agent)  # no warning or error dump
    res.stderr = "\n".join(line for line in res.stderr.splitlines() if line not in agent)
    line = one_line_error(res, 2, "vgpt train: ")
    assert res.stderr.strip() == line  # the agent's line only, not one per rank
    assert f"none of the {len(ckpts)} checkpoint(s)" in line and "checksum mismatch" in line
    assert snapshot(run) == before


def test_leftover_of_a_first_save_killed_before_its_commit_is_no_run_to_keep(run):
    """Nothing was ever committed (no `latest`, no manifest): starting over loses nothing."""
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_00000010")
    (ckpts / "latest").unlink()
    (ckpts / "step_00000005" / "manifest.json").unlink()
    res = vgpt("train", *BASE, *STEPS, f"--train.out_dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "leftover of a save killed before any was committed" in res.stderr
    assert steps_of(run) == list(range(1, 11))
    assert (ckpts / "step_00000005" / "manifest.json").is_file()


def test_resume_after_fallback_keeps_one_metrics_line_per_step(run):
    original = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in original] == list(range(1, 11))
    truncate(biggest_shard(run / "checkpoints" / "step_00000010"))
    res = vgpt("train", *BASE, "--train.steps=12", "--train.checkpoint_every=5", f"--train.out_dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step_00000005 at step 5" in res.stdout and "step_00000010 is not usable" in res.stderr
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))  # 6..10 once, retrained
    assert lines[:5] == original[:5]


def test_ckpt_list_checks_sizes_and_with_verify_hashes(run):
    newest = run / "checkpoints" / "step_00000010"
    truncate(biggest_shard(newest))
    res = cli("ckpt", "list", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "complete" in rows["step_00000005"] and "BROKEN" not in rows["step_00000005"]
    assert "BROKEN" in rows["step_00000010"] and "manifest says" in rows["step_00000010"]

    flipped = biggest_shard(run / "checkpoints" / "step_00000005")
    flip_bit(flipped)
    rows = {line.split()[0]: line for line in cli("ckpt", "list", str(run)).stdout.splitlines()[1:]}
    assert "complete" in rows["step_00000005"]  # sizes only: a flipped bit needs the hashes
    res = cli("ckpt", "list", str(run), "--verify")
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "BROKEN" in rows["step_00000005"] and "checksum mismatch" in rows["step_00000005"]
    assert res.returncode == 1  # a verification that found broken checkpoints, like `ckpt verify`


@pytest.mark.parametrize("damage", [truncate, flip_bit], ids=["truncated", "bit-flipped"])
def test_ckpt_verbs_fall_back_by_one_rule(run, tmp_path, damage):
    newest = run / "checkpoints" / "step_00000010"
    victim = biggest_shard(newest)
    damage(victim)
    before = snapshot(run)
    # without --step: the newest checkpoint that verifies, naming the one skipped and why
    out = tmp_path / "w.safetensors"
    res = cli("ckpt", "export", str(run), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exported step_00000005" in res.stdout and out.is_file()
    assert "Traceback" not in res.stderr
    skipped = [line for line in res.stderr.splitlines() if line.startswith("vgpt ckpt export: skipped")]
    assert len(skipped) == 1 and str(newest) in skipped[0] and victim.name in skipped[0]
    res = cli("ckpt", "inspect", str(run))
    assert res.returncode == 0 and "step 5 " in res.stdout, res.stderr[-3000:]
    # with --step: that one, refused when broken
    line = one_line_error(cli("ckpt", "export", str(run), "--out", str(tmp_path / "x.safetensors"), "--step", "10"),
                          1, "vgpt ckpt export: ")
    assert f"{newest} is broken" in line and victim.name in line
    assert not (tmp_path / "x.safetensors").exists()
    assert snapshot(run) == before


def test_ckpt_prune_never_removes_the_newest_checkpoint_that_verifies(run):
    """Newest checkpoints bit-flipped (sizes intact): they count for nothing, and the good one stays."""
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step_00000010", ckpts / "step_00000015")  # a third checkpoint, verifying
    assert cli("ckpt", "verify", str(run), "--step", "15").returncode == 0
    for tag in ("step_00000010", "step_00000015"):
        flip_bit(biggest_shard(ckpts / tag))
    res = cli("ckpt", "prune", str(run), "--keep-last", "1")
    # exit 1: the broken ones are left in place and named, one line each
    assert res.returncode == 1 and "removed 0 checkpoint(s)" in res.stdout, res.stdout + res.stderr
    assert [line.split()[3] for line in res.stderr.splitlines()] == ["step_00000010", "step_00000015"], res.stderr
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000005", "step_00000010", "step_00000015"]
    # once a newer one verifies again, the older good one is pruned and the broken ones are left alone
    shutil.rmtree(ckpts / "step_00000015")
    shutil.copytree(ckpts / "step_00000005", ckpts / "step_00000020")
    res = cli("ckpt", "prune", str(run), "--keep-last", "1")
    assert res.returncode == 1 and "removed 1 checkpoint(s): step_00000005" in res.stdout, res.stdout
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000010", "step_00000020"]


def test_ckpt_verify_without_checkpoints_fails_naming_the_folder(run, tmp_path):
    empty = tmp_path / "typo"
    empty.mkdir()
    line = one_line_error(cli("ckpt", "verify", str(empty)), 2, "vgpt ckpt")
    assert str(empty) in line and "no checkpoints" in line
    line = one_line_error(cli("ckpt", "verify", str(tmp_path / "missing")), 2, "vgpt ckpt")
    assert str(tmp_path / "missing") in line
    line = one_line_error(cli("ckpt", "verify", str(run), "--step", "7"), 2, "vgpt ckpt")
    assert "no checkpoint for step 7" in line and "steps: 5, 10" in line
    res = cli("ckpt", "verify", str(run))
    assert res.returncode == 0 and "step_00000005: ok" in res.stdout and "step_00000010: ok" in res.stdout
