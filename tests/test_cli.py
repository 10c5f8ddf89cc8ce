"""The interim main job through the real CLI: trains, prints progress, writes the curve."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import cli, env


@pytest.mark.slow
def test_train_debug_runs_and_writes_the_loss_curve(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "train-debug", "--train.steps=30",
                          "--train.log_every=10", f"--train.out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode == 0, out.stderr
    assert "step    30/30" in out.stdout and "samples/s" in out.stdout and "ETA" in out.stdout
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0 and "train-debug" in out.stdout


def test_every_verb_reports_bad_input_through_the_one_handler():
    import importlib

    from orchestration.cli import SUBCOMMANDS

    for name, (module, _) in SUBCOMMANDS.items():
        assert getattr(importlib.import_module(module).main, "reports_bad_input", False), name
    out = cli("config", "--config", "no/such.yaml")
    assert out.returncode == 2 and out.stderr.strip() == "vgpt config: config file 'no/such.yaml' does not exist"
