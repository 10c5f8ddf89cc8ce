"""`vgpt ckpt list | verify | export | reshard` on s3:// against an S3 server on
loopback (moto, tests/conftest.py), with a real checkpoint written by the
DeepSpeed trainer and uploaded as it lies on disk: a clean copy, a corrupted
file, and a save that never got its manifest; `reshard` reads the fragments by
ranged GETs and writes what it writes from the local disk. Credentials come from the environment only
and must never be printed; the endpoint from the environment or --endpoint-url."""
from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint.export import read_export_tensors

pytestmark = pytest.mark.slow  # every test here trains through DeepSpeed or reads such a run

SECRET = "vgpt-test-secret-never-printed"


@pytest.fixture
def run_dir(one_rank_run):
    """The shared one-rank run (tests/conftest.py): checkpoints at steps 5 and 10, uploaded, never changed."""
    return one_rank_run


@pytest.fixture
def s3_run(run_dir, s3_bucket, s3_server, monkeypatch):
    """The run's checkpoints uploaded to s3://BUCKET/run/checkpoints/; the CLI's env set like a user's."""
    fs, _, bucket = s3_bucket
    fs.put(str(run_dir / "checkpoints"), f"{bucket}/run/checkpoints", recursive=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return fs, f"s3://{bucket}/run", f"{bucket}/run/checkpoints"


def ckpt(capsys, *argv: str) -> tuple[int, str, str]:
    from orchestration.cli.ckpt import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    return rc, out, err


def test_list_verify_export_from_s3(s3_run, s3_server, run_dir, tmp_path, capsys, monkeypatch):
    fs, url, _ = s3_run
    rc, out, _ = ckpt(capsys, "list", url)
    assert rc == 0
    assert "step_00000005" in out and "step_00000010" in out and "<- latest" in out and "INCOMPLETE" not in out
    rc, out, _ = ckpt(capsys, "verify", url)
    assert rc == 0 and "step_00000005: ok" in out and "step_00000010: ok" in out
    target = tmp_path / "from_s3"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # the endpoint from the command line instead
    rc, out, err = ckpt(capsys, "export", url, "--out", str(target), "--endpoint-url", s3_server)
    assert rc == 0, err
    assert f"exported {url}/checkpoints/step_00000010" in out
    got, live = read_export_tensors(target), read_export_tensors(run_dir / "export")
    assert got.keys() == live.keys() and all(torch.equal(got[k], live[k]) for k in live)


def test_corrupted_object_is_named_and_refused(s3_run, tmp_path, capsys):
    fs, url, key = s3_run
    victim = max((p for p in fs.ls(f"{key}/step_00000010") if p.endswith(".safetensors")), key=fs.size)
    original = fs.cat(victim)
    fs.pipe(victim, original[:-100])  # a truncated upload
    rc, out, _ = ckpt(capsys, "verify", url)
    assert rc == 1 and "step_00000005: ok" in out and "step_00000010: BROKEN" in out
    assert f"s3://{victim}: " in out
    # one rule for every ckpt verb: without --step the newest checkpoint that verifies, naming what it skipped;
    # with --step that one or nothing
    rc, out, err = ckpt(capsys, "export", url, "--out", str(tmp_path / "x.safetensors"))
    assert rc == 0 and f"s3://{victim}" in err and "step_00000005" in out and (tmp_path / "x.safetensors").exists()
    rc, _, err = ckpt(capsys, "export", url, "--step", "10", "--out", str(tmp_path / "y.safetensors"))
    assert rc == 1 and f"s3://{victim}" in err and not (tmp_path / "y.safetensors").exists()
    fs.pipe(victim, b"\0" * len(original))  # same size, other bytes: only the hash can tell
    rc, out, _ = ckpt(capsys, "verify", url, "--step", "10")
    assert rc == 1 and f"s3://{victim}: checksum mismatch" in out


def test_save_without_manifest_is_incomplete_and_skipped(s3_run, tmp_path, capsys):
    fs, url, key = s3_run
    fs.rm(f"{key}/step_00000010/manifest.json")
    rc, out, _ = ckpt(capsys, "list", url)
    assert rc == 0 and "INCOMPLETE" in out.split("step_00000010")[1].splitlines()[0]
    rc, out, err = ckpt(capsys, "export", url, "--out", str(tmp_path / "y.safetensors"))
    assert rc == 0 and "step_00000005" in out, err
    rc, out, _ = ckpt(capsys, "inspect", url)
    assert rc == 2


def test_reshard_from_s3_reads_byte_ranges_and_equals_the_one_from_disk(s3_run, run_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """`vgpt ckpt reshard s3://...` reads each parameter's fragments by ranged GETs where they lie (no
    local copy of the checkpoint first) and writes what the same verb writes from the local disk, byte
    for byte: the portable form whose resume on another layout test_checkpoint_layout checks against
    an uninterrupted run."""
    from pretrain.checkpoint import fragment_reader

    _, url, _ = s3_run
    ranged = []
    real = fragment_reader.ByteRanges.read
    monkeypatch.setattr(fragment_reader.ByteRanges, "read", lambda self, path, offset, length: (
        ranged.append((self.fs is not None, length)), real(self, path, offset, length))[1])
    rc, out, err = ckpt(capsys, "reshard", url, "--step", "10", "--dp", "2", "--out", str(tmp_path / "s3"))
    assert rc == 0, err
    assert f"resharded {url}/checkpoints/step_00000010" in out and ranged and all(remote for remote, _ in ranged)
    rc, _, err = ckpt(capsys, "reshard", str(run_dir), "--step", "10", "--dp", "2", "--out", str(tmp_path / "disk"))
    assert rc == 0, err
    s3, disk = tmp_path / "s3" / "step_00000010", tmp_path / "disk" / "step_00000010"
    assert sorted(p.name for p in s3.iterdir()) == sorted(p.name for p in disk.iterdir())
    for name in ("weights.safetensors", "exp_avg.safetensors", "exp_avg_sq.safetensors", "optimizer.json",
                 "rng.safetensors", "trainer_state.json"):
        assert (s3 / name).read_bytes() == (disk / name).read_bytes(), name
    rc, out, _ = ckpt(capsys, "verify", str(tmp_path / "s3"))
    assert rc == 0 and "step_00000010: ok" in out
