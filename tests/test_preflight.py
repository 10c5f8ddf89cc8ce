"""Fail loudly, lose nothing: bad data, paths, credentials and flags stop `vgpt train/precompute/predict`
before any set-up, with one line naming the key or file, exit status 2 and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.synthetic.shards import write_toy_dataset
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from orchestration.cli import main
from pretrain.training.metrics_window import skipped_window_error

REPO = Path(__file__).resolve().parents[1]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture
def env(no_s3_credentials):
    return no_s3_credentials


def train_args(tmp: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(REPO / "configs/debug.yaml"), "--train.data=latents",
            f"--data.root={tmp / 'latents'}", f"--train.out_dir={tmp / 'run'}", "--train.steps=1", *extra]


def _config_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
    return argv[2], argv[3:]


def expect_bad(capsys, tmp: Path, argv: list[str], *needles: str) -> str:
    before = files_under(tmp)
    rc, out = run_cli(capsys, *argv)
    assert rc == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    for n in needles:
        assert n in out, out
    assert files_under(tmp) == before, files_under(tmp) - before
    return out


def test_frames_longer_than_every_video_fail_before_training(env, capsys):
    write_toy_dataset(str(env / "latents"), [2, 1], frames=9, shape=(4, 4, 4))
    # fixed interval 4: 3 frames need 9 stored frames (fine), 4 frames need 13 (no video has them)
    from jobconfig.curriculum import plan_stages
    from orchestration.preflight import check_train
    check_train(plan_stages(*_config_and_overrides(train_args(env, "--data.stage.frames=3")), None))  # passes
    expect_bad(capsys, env, train_args(env, "--data.stage.frames=4"), "vgpt train:", "data.stage.frames=4",
               "longest video", "9 frames")
    assert not (env / "run").exists()


def test_shard_totals_too_short_fail_without_reading_shards(env, capsys):
    write_toy_dataset(str(env / "latents"), [2], frames=5, shape=(4, 4, 4))
    expect_bad(capsys, env, train_args(env, "--data.stage.frames=40"), "needs videos of >= 157 frames")


def as_precompute_writes_it(root: Path) -> None:
    """`vgpt precompute` records each sample's shape in index.json but no dataset-wide latent_shape
    (only the toy writer adds one): drop it, so the checks run on what real datasets hold."""
    index = json.loads((root / "index.json").read_text())
    del index["latent_shape"]
    (root / "index.json").write_text(json.dumps(index))


def test_a_stage_no_sample_fits_is_refused_before_torchrun(env, capsys, monkeypatch):
    """Issue 25: 3 frames of random clips from a 4x4 latent (patch 2: 4 patches, 6 tokens a frame copy)
    take at least (F + 1) * 6 = 24 tokens, the loader's own bound (data/buckets.py), not F * 6 = 18. A
    max_tokens no sample fits is refused with one line naming the key, before torchrun is started."""
    import subprocess

    from jobconfig.curriculum import plan_stages
    from orchestration.preflight import check_train

    write_toy_dataset(str(env / "latents"), [2, 2], frames=9, shape=(4, 4, 4))
    as_precompute_writes_it(env / "latents")
    stage = ["--data.stage.frames=3", "--data.stage.clips=random", "--data.stage.interval_value=1",
             "--data.stage.patch_size=2", "--data.epochs=1"]
    check_train(plan_stages(*_config_and_overrides(train_args(env, *stage, "--data.stage.max_tokens=24")), None))
    from data.loader import LatentLoader  # the loader agrees: at 24 it serves samples, at 23 none fit
    fits = plan_stages(*_config_and_overrides(train_args(env, *stage, "--data.stage.max_tokens=24")), None)[0][1]
    assert sum(len(b.clips) for b in LatentLoader(fits.data)) > 0
    spawned = []
    for name in ("call", "Popen", "run"):  # any child process would be torchrun: record, never start
        monkeypatch.setattr(subprocess, name, lambda *a, **k: spawned.append(a) or 0)
    monkeypatch.setattr("orchestration.cli.train.run_plan", lambda *a, **k: spawned.append("in-process run"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # an earlier in-process run may leave it: --nproc spawns
    out = expect_bad(capsys, env, train_args(env, *stage, "--data.stage.max_tokens=23", "--nproc", "2"),
                     "vgpt train:", "data.stage.max_tokens=23", "no sample", "24 tokens")
    assert spawned == [], "torchrun was started"
    assert "rendezvous" not in out and "rank" not in out.lower()
    with pytest.raises(ConfigError, match="data.stage.max_tokens=23: no sample"):
        LatentLoader(plan_stages(*_config_and_overrides(
            train_args(env, *stage, "--data.stage.max_tokens=23")), None)[0][1].data)


def test_an_index_without_per_sample_shapes_still_reads(env, capsys):
    """An index of before per-sample shapes: shard totals still refuse a stage longer than any shard,
    and the rest passes to the loader, which reads it as one bucket."""
    from jobconfig.curriculum import plan_stages
    from orchestration.preflight import check_train

    write_toy_dataset(str(env / "latents"), [2], frames=5, shape=(4, 4, 4), record_shapes=False)
    as_precompute_writes_it(env / "latents")
    expect_bad(capsys, env, train_args(env, "--data.stage.frames=40"), "data.stage.frames=40",
               "needs videos of >= 157 frames", "no shard")
    plan = plan_stages(*_config_and_overrides(train_args(env, "--data.stage.frames=2", "--data.epochs=1",
                                                         "--data.stage.interval_value=1")), None)
    check_train(plan)
    from data.loader import LatentLoader
    loader = LatentLoader(plan[0][1].data)
    assert not loader.meta.has_shapes and loader.buckets.names == ("any",)
    assert sum(len(b.clips) for b in loader) > 0


def test_missing_root_no_index_and_corrupt_index(env, capsys):
    expect_bad(capsys, env, train_args(env), "data.root", "latents does not exist")
    (env / "latents").mkdir()
    expect_bad(capsys, env, train_args(env), "data.root", "no index.json")
    (env / "latents" / "index.json").write_text("{not json")
    expect_bad(capsys, env, train_args(env), "data.root", "unreadable index")


def test_out_dir_init_from_and_resume(env, capsys):
    write_toy_dataset(str(env / "latents"), [2], frames=70, shape=(4, 4, 4))
    (env / "afile").write_text("x")
    expect_bad(capsys, env, train_args(env, f"--train.out_dir={env / 'afile'}"), "train.out_dir", "existing file")
    expect_bad(capsys, env, train_args(env, f"--train.init_from={env / 'nope.safetensors'}"),
               "train.init_from", "does not exist")
    expect_bad(capsys, env, train_args(env, f"--train.init_from={env / 'afile'}"), "train.init_from",
               "not a safetensors export")
    expect_bad(capsys, env, train_args(env, "--resume", str(env / "nope")), "--resume", "does not exist")
    expect_bad(capsys, env, train_args(env, "--resume", str(env / "afile")), "--resume", "expected a checkpoint")
    (env / "notckpt").mkdir()
    expect_bad(capsys, env, train_args(env, "--resume", str(env / "notckpt")), "--resume",
               "not a complete checkpoint")


def test_s3_without_credentials_names_key_and_variables(env, capsys, monkeypatch):
    out = expect_bad(capsys, env, train_args(env, "--data.root=s3://bucket/latents"), "data.root",
                     "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
    assert "NoCredentialsError" not in out
    from orchestration.preflight import s3_credentials_available
    assert s3_credentials_available({"anon": True})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    assert s3_credentials_available({})


def test_yaml_errors_name_the_file_and_line(env, capsys):
    bad = env / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1,\n")
    expect_bad(capsys, env, ["train", "--config", str(bad)], "bad.yaml", "line ", "invalid YAML")
    empty = env / "empty.yaml"
    empty.write_text("# nothing\n")
    expect_bad(capsys, env, ["train", "--config", str(empty)], "empty.yaml", "empty config file")
    expect_bad(capsys, env, ["train", "--config", str(env)], "is a directory, expected a YAML file")
    expect_bad(capsys, env, ["train", "--config", str(REPO / "configs/debug.yaml"), "--nproc=0"],
               "--nproc", "expected >= 1")


def test_predict_checkpoint_dir_and_missing_video(env, capsys):
    (env / "ckptdir").mkdir()
    expect_bad(capsys, env, ["predict", "--checkpoint", str(env / "ckptdir"), "--video", "x.mp4"],
               "a directory without config.json", "vgpt ckpt export")
    (env / "run" / "checkpoints").mkdir(parents=True)  # a run's out_dir: its export is named
    expect_bad(capsys, env, ["predict", "--checkpoint", str(env / "run"), "--video", "x.mp4"],
               "is a run's out_dir", str(env / "run" / "export"))
    expect_bad(capsys, env, ["predict", "--checkpoint", str(env / "none.safetensors"), "--video", "x.mp4"],
               "--checkpoint", "does not exist")


def test_precompute_inputs_and_credentials(env, capsys):
    cfg = str(REPO / "configs/precompute/tiny.yaml")
    expect_bad(capsys, env, ["precompute", "--config", cfg, f"--precompute.inputs.dir={env / 'novideos'}",
                             f"--precompute.output.root={env / 'out'}"], "precompute.inputs.dir", "does not exist")
    (env / "videos").mkdir()
    expect_bad(capsys, env, ["precompute", "--config", cfg, f"--precompute.inputs.dir={env / 'videos'}",
                             "--precompute.output.root=s3://b/out"], "precompute.output.root", "AWS_ACCESS_KEY_ID")


def test_resume_modes_pass_preflight(tmp_path):
    """Every --resume mode passes into a new out_dir; into one holding a run, `none` is refused before
    any set-up, `auto` and `fresh` pass, and the preflight itself changes nothing."""
    from orchestration.preflight import check_resume
    from pretrain.checkpoint.integrity import write_manifest

    new_run = tmp_path / "new"
    for mode in ("auto", "none", "fresh"):
        assert check_resume(mode, str(new_run)) is None
    assert not new_run.exists()
    earlier = tmp_path / "earlier"
    ckpt = earlier / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "rank-00000.safetensors").write_bytes(b"\0" * 64)
    write_manifest(ckpt, 5)
    (earlier / "checkpoints" / "latest").write_text(ckpt.name)
    before = sorted(p for p in earlier.rglob("*"))
    check_resume("auto", str(earlier))
    check_resume("fresh", str(earlier))
    check_resume(str(ckpt), str(earlier))
    with pytest.raises(ConfigError, match=r"--resume none: .* already holds checkpoints \(step_00000005\)"):
        check_resume("none", str(earlier))
    (ckpt / "rank-00000.safetensors").write_bytes(b"\0" * 10)  # a truncated file: sizes disagree
    with pytest.raises(ConfigError, match=r"--resume auto: none of the 1 checkpoint\(s\)"):
        check_resume("auto", str(earlier))
    with pytest.raises(ConfigError, match=r"--resume: .*step_00000005 is not a complete checkpoint"):
        check_resume(str(ckpt), str(earlier))
    assert sorted(p for p in earlier.rglob("*")) == before


def test_a_window_the_loader_mostly_skipped_stops_the_run_with_the_reasons():
    """Past preflight (some video is long enough), a stage whose samples are mostly skipped stops
    with the skip reasons instead of training on nothing (train.max_skipped_fraction)."""
    records = [{"step": 5, "samples": 1.0}, {"step": 6, "samples": 0.0}]
    reasons = ["too_short"] * 6 + ["corrupt_sample"] * 2  # 2 replicas of one data-parallel rank (TP 2)
    msg = skipped_window_error(records, reasons, replicas=2, limit=0.5)
    assert msg == ("data: 4 of 5 samples of steps 5..6 were skipped (corrupt_sample: 1, too_short: 3), over "
                   "train.max_skipped_fraction=0.5; check data.stage (frames, interval, max_tokens) against the dataset")
    assert skipped_window_error(records, reasons[:2], replicas=2, limit=0.5) is None  # 1 of 2: not over half
    assert skipped_window_error([{"step": 1, "samples": 0.0}], [], replicas=1, limit=0.0) is None  # nothing seen
    with pytest.raises(ConfigError, match=r"max_skipped_fraction: got 1.5, expected a value in \[0, 1\]"):
        load_config(None, ["--train.max_skipped_fraction=1.5"])
