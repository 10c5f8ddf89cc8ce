"""Acceptance 6 of the foundation: every YAML in configs/ loads; bad keys and
values fail before any work, naming the key path and what was allowed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.loader import CONFIG_ROOT, from_dict, load_config, model_presets
from jobconfig.model import ModelConfig
from tests.runs import cli

ALL_YAML = sorted(CONFIG_ROOT.rglob("*.yaml"))


def test_config_dir_is_not_empty():
    assert {"debug", "s1", "s2", "s3", "phi3-mini"} <= set(model_presets())


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_every_config_file_loads(path: Path):
    raw = yaml.safe_load(path.read_text())
    if path.parent == CONFIG_ROOT / "model":
        cfg = from_dict(ModelConfig, raw, "model")
        assert cfg.hidden_size % cfg.num_heads == 0
    elif path.parent == CONFIG_ROOT / "cluster":  # a cluster description for `vgpt launch`
        from orchestration.launch.cluster import ClusterConfig
        assert isinstance(load_config(path, cls=ClusterConfig), ClusterConfig)
    elif path.parent == CONFIG_ROOT / "sweep":  # a scaling-law sweep: its grid must expand into valid trials
        from orchestration.sweep.config import SweepConfig
        from orchestration.sweep.trial import plan
        if raw.get("dataset"):  # the user's latents: refused until the placeholder is set (its grid: test_sweep)
            with pytest.raises(ConfigError, match=r"^dataset: .* is a placeholder"):
                load_config(path, cls=SweepConfig)
        else:
            assert plan(load_config(path, cls=SweepConfig))
    elif "stages" in raw:  # a curriculum: every stage, merged with the shared sections
        from jobconfig.curriculum import plan_stages
        plan = plan_stages(str(path), [], None)
        assert [name for name, _ in plan] == [f"stage{i}" for i in range(1, len(raw["stages"]) + 1)]
        assert all(isinstance(cfg, JobConfig) for _, cfg in plan)
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
    out = cli("train-debug", "--train.stepz=3", f"--train.out_dir={tmp_path}/run")
    assert out.returncode == 2
    assert "unknown config key 'train.stepz'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_pretrain_curriculum_follows_method_md():
    from jobconfig.curriculum import plan_stages
    plan = dict(plan_stages(str(CONFIG_ROOT / "pretrain.yaml"), [], None))
    assert [plan[f"stage{i}"].data.stage.frames for i in range(1, 5)] == [16, 48, 48, 80]
    assert plan["stage1"].data.stage.clips == "single_frame" and plan["stage2"].data.stage.clips == "random"
    assert plan["stage3"].data.stage.interval == "random" and plan["stage2"].data.stage.interval_value == 4
    for cfg in plan.values():  # shared sections reach every stage
        assert (cfg.model.hidden_size, cfg.train.lr, cfg.train.schedule) == (3072, 1e-4, "constant")
        assert (cfg.train.weight_decay, cfg.train.grad_clip, cfg.parallel.zero_stage) == (0.1, 1.0, 2)
        # the reference's warmup, restarted each stage, in its scheduler steps (tests/test_schedule.py)
        assert (cfg.train.warmup_scheduler_steps, cfg.train.warmup_steps) == (320000, 0)
        # the reference trains every stage, stage 4 included, without sequence parallel
        assert (cfg.parallel.sequence_parallel, cfg.parallel.tensor_parallel) == (1, 1)
    # stage 1's AdamW is torch's default (the reference's script drops its flags); stages 2-4 pass them
    assert [(plan[f"stage{i}"].train.betas, plan[f"stage{i}"].train.eps) for i in range(1, 5)] == \
        [((0.9, 0.999), 1e-8)] + [((0.9, 0.95), 1e-5)] * 3


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_file_alone_has_its_optimiser_and_warmup(stage):
    """`vgpt train --config configs/stages/stageN.yaml` (or `vgpt launch`) gets the stage's own
    AdamW and warmup, not only through pretrain.yaml."""
    tc = load_config(CONFIG_ROOT / "stages" / f"stage{stage}.yaml").train
    betas, eps = ((0.9, 0.999), 1e-8) if stage == 1 else ((0.9, 0.95), 1e-5)
    assert (tc.betas, tc.eps, tc.weight_decay, tc.lr, tc.grad_clip) == (betas, eps, 0.1, 1e-4, 1.0)
    assert (tc.warmup_scheduler_steps, tc.warmup_steps) == (320000, 0)
    if stage == 4:
        assert load_config(CONFIG_ROOT / "stages" / "stage4.yaml").parallel.sequence_parallel == 1


def test_predict_defaults_are_the_reference_inference_script():
    from jobconfig.predict import PredictConfig
    p = load_config(None).predict
    assert (p.clip_frames, p.max_frame_window, p.guidance, p.steps) == (24, 80, 1.5, 50)
    # the window counts frames and keeps context frame by frame: one context frame plus the clip suffices
    PredictConfig(clip_frames=24, max_frame_window=25).validate()
    with pytest.raises(ConfigError, match=r"predict\.max_frame_window: got 24, expected > clip_frames=24"):
        load_config(None, ["--predict.max_frame_window=24"])


def test_quickstart_sets_every_predict_field_it_uses():
    """The quickstart predicts at toy scale on CPU; the reference-sized defaults must not reach it."""
    from jobconfig.predict import PredictConfig
    raw = yaml.safe_load((CONFIG_ROOT / "quickstart.yaml").read_text())["predict"]
    assert set(raw) == {f.name for f in dataclasses.fields(PredictConfig)} - {"i3d_path"}
    from jobconfig.curriculum import plan_stages
    for _, cfg in plan_stages(str(CONFIG_ROOT / "quickstart.yaml"), [], None):
        assert (cfg.predict.clip_frames, cfg.predict.max_frame_window) == (1, 12)


def test_a_bad_key_in_a_later_stage_fails_naming_the_stage(tmp_path):
    from jobconfig.curriculum import plan_stages
    (tmp_path / "s1.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "s2.yaml").write_text("train: {stepz: 3}\n")
    (tmp_path / "all.yaml").write_text("stages: [s1.yaml, s2.yaml]\nmodel: {preset: debug}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*\(stage 2: .*s2.yaml\)"):
        plan_stages(str(tmp_path / "all.yaml"), [], None)


def test_inline_stages_merge_and_fail_naming_the_stage(tmp_path):
    from jobconfig.curriculum import plan_stages
    (tmp_path / "inline.yaml").write_text("stages:\n  - train: {steps: 3}\n  - train: {steps: 5, lr: 0.5}\n"
                                          "train: {lr: 0.25}\n")
    plan = dict(plan_stages(str(tmp_path / "inline.yaml"), [], None))
    assert (plan["stage1"].train.steps, plan["stage1"].train.lr) == (3, 0.25)
    assert (plan["stage2"].train.steps, plan["stage2"].train.lr) == (5, 0.5)
    (tmp_path / "bad.yaml").write_text("stages:\n  - train: {steps: 3}\n  - train: {stepz: 5}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*\(stage 2: .*bad.yaml\)"):
        plan_stages(str(tmp_path / "bad.yaml"), [], None)


def test_a_stage_beyond_a_single_stage_file_is_refused():
    """`--stage 2` of a file of one stage used to train nothing and exit 0."""
    from jobconfig.curriculum import plan_stages

    with pytest.raises(ConfigError, match=r"--stage: got 2, expected 1\.\.1"):
        plan_stages(str(CONFIG_ROOT / "stages" / "stage1.yaml"), [], 2)
    assert [name for name, _ in plan_stages(str(CONFIG_ROOT / "stages" / "stage1.yaml"), [], 1)] == ["stage1"]


def test_errors_name_the_file_or_the_command_line_override(tmp_path):
    """A bad value set on the command line is not reported as the file's, in a job file or a curriculum."""
    from jobconfig.curriculum import plan_stages
    job = tmp_path / "job.yaml"
    job.write_text("model: {preset: debug}\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"^train\.lr: got 'fast', expected a number "
                                          r"\(from the command line: --train\.lr\)$"):
        load_config(job, ["--train.lr=fast"])
    job.write_text("model: {preset: debug}\ntrain: {steps: many}\n")
    with pytest.raises(ConfigError, match=rf"^train\.steps: got 'many', expected an integer \(in {job}\)$"):
        load_config(job, ["--train.lr=0.5"])
    (tmp_path / "s1.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "all.yaml").write_text("stages: [s1.yaml]\nmodel: {preset: debug}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hiden_size'.*\(from the command line: "
                                          r"--model\.hiden_size\)$"):
        plan_stages(str(tmp_path / "all.yaml"), ["--model.hiden_size=8"], None)
    # valid alone, wrong together (hidden_size 60 with the file's 4 heads): both are named
    with pytest.raises(ConfigError, match=r"\(stage 1: .*s1\.yaml with the command line's --model\.hidden_size\)$"):
        plan_stages(str(tmp_path / "all.yaml"), ["--model.hidden_size=60"], None)


def test_overrides_leave_the_raw_mapping_alone():
    """Overrides apply to a copy: the file's own mapping (shared by every stage of a curriculum) is unchanged."""
    from jobconfig.loader import resolve_raw
    raw = {"model": {"preset": "debug"}, "train": {"steps": 3}}
    assert resolve_raw(raw, [("train.steps", 5)])["train"]["steps"] == 5 and raw["train"]["steps"] == 3
