"""Runs that survive: elastic restart after a SIGKILL, corrupt and half-written
checkpoints, and the `vgpt ckpt` tools. CPU, gloo, the real DeepSpeed engine."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig
from pretrain.checkpoint.export import load_exported_model, read_export_tensors, save_export
from pretrain.model.videogpt import build_model
from tests.runs import TINY, TWO_RANK_STEPS, TWO_RANK_ZERO2, cli, copy_run, rows_by_step, vgpt

BASE = [*TINY, "--train.steps=12", "--train.checkpoint_every=5", "--train.log_every=4"]


@pytest.fixture(scope="module")
def uninterrupted(two_rank_zero2):
    """2 ranks under ZeRO-2, 20 steps, checkpoints every 5 steps: the shared run (tests/conftest.py)."""
    return two_rank_zero2


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [6, 7, 8, 9])  # every step between the checkpoints at 5 and 10
def test_sigkilled_rank_restarts_and_finishes_bitwise(uninterrupted, tmp_path, kill_step):
    res = vgpt("train", *TINY, *TWO_RANK_ZERO2, f"--train.out_dir={tmp_path}", "--max-restarts=1",
               env_extra={"VGPT_FAULT_KILL": f"1:{kill_step}"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed debug from" in res.stdout and "step_00000005 at step 5" in res.stdout
    a, b = read_export_tensors(tmp_path / "export"), read_export_tensors(uninterrupted / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {kill_step}"
    # the loader delivered the same samples: the last record of every step equals the uninterrupted run's
    assert rows_by_step(tmp_path) == rows_by_step(uninterrupted)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_named_and_skipped(one_rank_run, tmp_path):
    run = copy_run(one_rank_run, tmp_path / "run")  # ONE_RANK: 10 steps, checkpoints at 5 and 10
    newest = run / "checkpoints" / "step_00000010"
    victim = max((p for p in newest.iterdir() if p.name.endswith(".safetensors")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    res = cli("ckpt", "verify", str(run))
    assert res.returncode == 1 and f"{victim}: " in res.stdout and "step_00000005: ok" in res.stdout
    res = vgpt("train", *BASE, f"--train.out_dir={run}")  # steps=12: resume, must fall back to step 5
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint {newest} is not usable" in res.stderr and victim.name in res.stderr
    assert "resumed debug from" in res.stdout and "step_00000005 at step 5" in res.stdout


@pytest.mark.slow
def test_save_killed_half_way_never_becomes_latest(tmp_path):
    res = vgpt("train", *BASE, f"--train.out_dir={tmp_path}", env_extra={"VGPT_FAULT_CKPT": "before_manifest:10"})
    assert res.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000005"
    assert (ckpts / "step_00000010").is_dir() and not (ckpts / "step_00000010" / "manifest.json").exists()
    listing = cli("ckpt", "list", str(tmp_path)).stdout
    assert "step_00000010" in listing and "INCOMPLETE" in listing and "step_00000005" in listing
    res = vgpt("train", *BASE, f"--train.out_dir={tmp_path}")
    assert res.returncode == 0 and "step_00000005 at step 5" in res.stdout


@pytest.mark.slow
def test_ckpt_export_equals_the_live_model_and_loads_with_safetensors_alone(uninterrupted, tmp_path):
    out = tmp_path / "exported"
    res = cli("ckpt", "export", str(uninterrupted), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["_videogpt"]["step"] == TWO_RANK_STEPS
    a, b = load_file(str(out / "diffusion_pytorch_model.safetensors")), read_export_tensors(uninterrupted / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every file published gets the mode open() gives a new file here (safetensors alone would make it 0600)
    (tmp_path / "probe").write_text("")
    mode = (tmp_path / "probe").stat().st_mode & 0o777
    published = [p for root in (out, uninterrupted / "export", uninterrupted / "checkpoints") for p in root.rglob("*")
                 if p.is_file() and not p.is_symlink()]
    assert len(published) > 5 and {str(p): oct(p.stat().st_mode & 0o777) for p in published
                                   if p.stat().st_mode & 0o777 != mode} == {}
    inspect = cli("ckpt", "inspect", str(uninterrupted)).stdout
    assert f"step {TWO_RANK_STEPS}" in inspect and "(192, 64)" in inspect
    assert "backbone.layers.0.self_attn.qkv_proj.weight" in inspect


def test_export_of_an_earlier_format_is_refused_naming_it(tmp_path):
    """Exports of format 1 hold another model (bidirectional clean clips, no delimiters, t x 1000)."""
    model = build_model(ModelConfig())
    current = save_export(model.state_dict(), tmp_path / "new.safetensors", model.cfg)
    assert load_exported_model(current).special_tokens.shape == (3, 64)
    old = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(1)}, str(old), metadata={"model_config": "{}", "format": "videogpt-export-1"})
    with pytest.raises(ConfigError, match="export format 'videogpt-export-1', expected 'videogpt-export-2'"):
        load_exported_model(old)
