"""Acceptance 6 of the foundation: every YAML in configs/ loads; bad keys and
values fail before any work, naming the key path and what was allowed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestration.config import CONFIG_ROOT, JobConfig, from_dict, load_config, model_presets
from pretrain.config import ConfigError, ModelConfig

ALL_YAML = sorted(CONFIG_ROOT.rglob("*.yaml"))


def test_config_dir_is_not_empty():
    assert {"debug", "s1", "s2", "s3", "phi3-mini"} <= set(model_presets())


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_every_config_file_loads(path: Path):
    if path.parent == CONFIG_ROOT / "model":
        cfg = from_dict(ModelConfig, yaml.safe_load(path.read_text()), "model")
        assert cfg.hidden_size % cfg.num_heads == 0
    else:
        assert isinstance(load_config(path), JobConfig)


def test_phi3_mini_preset_has_the_reference_shape():
    m = load_config(None, ["--model.preset=phi3-mini"]).model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.mlp_size) == (3072, 32, 32, 8192)


def test_unknown_key_names_its_path(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("model:\n  preset: debug\n  hiden_size: 32\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden_size'.*hidden_size"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'"):
        load_config(None, ["--trian.steps=3"])


def test_bad_values_name_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"model.attention: got 'fast', expected one of \['auto', 'flex', "):
        load_config(None, ["--model.attention=fast"])
    with pytest.raises(ConfigError, match=r"train.steps: got 'many', expected an integer"):
        load_config(None, ["--train.steps=many"])
    with pytest.raises(ConfigError, match=r"model.num_heads: got 5, expected a divisor of hidden_size=64"):
        load_config(None, ["--model.num_heads=5"])
    with pytest.raises(ConfigError, match=r"model.preset: got 'huge', expected one of \[.*'debug'"):
        load_config(None, ["--model.preset=huge"])
    with pytest.raises(ConfigError, match=r"objective.context_noise_min: got 1.5"):
        load_config(None, ["--objective.context_noise_min=1.5"])


def test_overrides_apply_on_top_of_presets():
    cfg = load_config(CONFIG_ROOT / "debug.yaml", ["--model.num_layers=3", "--train.lr=0.5"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64 and cfg.train.lr == 0.5


def test_cli_rejects_a_bad_key_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "train-debug", "--train.stepz=3",
                          f"--train.out_dir={tmp_path}/run"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown config key 'train.stepz'" in out.stderr
    assert not (tmp_path / "run").exists()
