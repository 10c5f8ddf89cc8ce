"""Fail loudly, lose nothing: bad data, paths, credentials and flags stop `vgpt train/precompute/predict`
before any set-up, with one line naming the key or file, exit status 2 and nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest

from data.synthetic.shards import write_toy_dataset
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from orchestration.cli import main
from pretrain.training.trainer import skipped_window_error

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


def test_resume_modes_pass_preflight():
    from orchestration.preflight import check_resume
    for mode in ("auto", "none", "fresh"):
        check_resume(mode)


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
