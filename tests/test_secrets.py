"""Credentials never enter a config, and nothing a run writes ever contains one (issue "Fail loudly,
lose nothing", A): refused at validation at any depth, redacted defensively by writers."""
from __future__ import annotations

import pytest

from jobconfig.data import DataConfig
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from jobconfig.secrets import REDACTED, check_no_credentials, find_credentials, is_credential_key, redact
from tests.runs import AWS, REPO, TINY, cli


def test_credential_keys_are_recognised_case_insensitively():
    for k in ("key", "secret", "token", "password", "AWS_Access_Key_Id", "aws_secret_access_key",
              "aws_session_token", "access_key", "Secret_Key", "session_token", "client_secret", "api-key"):
        assert is_credential_key(k), k
    for k in ("endpoint_url", "region_name", "use_ssl", "anon", "client_kwargs", "max_tokens_per_s",
              "requester_pays", "default_block_size"):
        assert not is_credential_key(k), k


def test_nested_credentials_are_found_and_redacted():
    opts = {"endpoint_url": "http://s3:9000",
            "client_kwargs": {"region_name": "x", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
            "config_kwargs": [{"token": "t0k3n"}]}
    assert find_credentials(opts, "storage_options") == ["storage_options.client_kwargs.AWS_SECRET_ACCESS_KEY",
                                                        "storage_options.config_kwargs[0].token"]
    with pytest.raises(ConfigError, match=r"storage_options\.client_kwargs\.AWS_SECRET_ACCESS_KEY: credentials"):
        check_no_credentials(opts, "storage_options")
    out = redact(opts)
    assert out["client_kwargs"] == {"region_name": "x", "AWS_SECRET_ACCESS_KEY": REDACTED}
    assert out["config_kwargs"] == [{"token": REDACTED}] and out["endpoint_url"] == "http://s3:9000"
    assert opts["client_kwargs"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"   # a copy, not in place
    check_no_credentials({"endpoint_url": "x", "client_kwargs": {"region_name": "y"}}, "storage_options")


def test_redact_replaces_credential_env_values_anywhere(monkeypatch):
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    text = f"cmd --x={AWS['AWS_SECRET_ACCESS_KEY']} id={AWS['AWS_ACCESS_KEY_ID']}"
    assert redact({"argv": [text], "n": 3}) == {"argv": ["cmd --x=*** id=***"], "n": 3}


@pytest.mark.parametrize("opts", ["{key: X, secret: Y}", "{client_kwargs: {aws_secret_access_key: Y}}",
                                  "{endpoint_url: e, config_kwargs: {Token: Z}}"])
def test_data_config_refuses_credentials_at_any_depth(opts):
    with pytest.raises(ConfigError, match="credentials are not allowed.*AWS_ACCESS_KEY_ID"):
        load_config("configs/debug.yaml", [f"--data.storage_options={opts}"])
    with pytest.raises(ConfigError, match=r"storage_options\.client_kwargs\.secret_key"):
        DataConfig(storage_options={"client_kwargs": {"secret_key": "x"}}).validate()
    DataConfig(storage_options={"client_kwargs": {"endpoint_url": "http://s3:9000"}}).validate()


@pytest.mark.parametrize("where", ["inputs", "output"])
def test_precompute_config_refuses_nested_credentials(where):
    with pytest.raises(ConfigError, match=rf"precompute\.{where}\.storage_options\.client_kwargs\.aws_secret"):
        load_config("configs/precompute/tiny.yaml",
                    [f"--precompute.{where}.storage_options={{client_kwargs: {{aws_secret_access_key: Y}}}}"])


@pytest.mark.parametrize("opts", ["{key: X, secret: Y}", "{client_kwargs: {key: X, secret: Y}}"])
def test_train_and_precompute_cli_exit_2_with_one_line_and_write_nothing(tmp_path, opts):
    out = tmp_path / "run"
    r = cli("train", *TINY, f"--train.out_dir={out}", "--train.steps=2", f"--data.storage_options={opts}")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "credentials are not allowed" in lines[0], lines
    assert not out.exists()
    root = tmp_path / "lat"
    r = cli("precompute", "--config", str(REPO / "configs/precompute/tiny.yaml"), f"--precompute.output.root={root}",
            f"--precompute.inputs.storage_options={opts}")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "credentials are not allowed" in lines[0], lines
    assert not root.exists()


@pytest.mark.slow
def test_nothing_a_run_writes_contains_credentials_from_the_environment(one_rank_run):
    """The shared one-rank run (tests/conftest.py) trained with AWS's values in its environment."""
    files = [p for p in one_rank_run.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    for p in files:
        data = p.read_bytes()
        for v in AWS.values():
            assert v.encode() not in data, f"{p} contains the value of a credential variable"


def test_launch_refuses_credentials_in_cluster_env_and_redacts_written_files(tmp_path, monkeypatch):
    from orchestration.launch.plan import plan_launch, render
    cluster = str(REPO / "configs/cluster/local-cpu.yaml")
    with pytest.raises(ConfigError, match=r"env\.AWS_SECRET_ACCESS_KEY: credentials are not allowed"):
        plan_launch(1, cluster, cluster_overrides=["--env={AWS_SECRET_ACCESS_KEY: x}"])
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    spec = plan_launch(1, cluster)
    spec.overrides.append(f"--data.shuffle_buffer=1 # {AWS['AWS_SECRET_ACCESS_KEY']}")
    for target in ("torchrun", "deepspeed", "slurm", "k8s"):
        for p in render(spec, target, tmp_path / target):
            data = p.read_bytes()
            assert all(v.encode() not in data for v in AWS.values()), p


@pytest.mark.slow  # the shared one-rank run's export
def test_ckpt_and_predict_on_s3_without_credentials_exit_2_with_one_line(no_s3_credentials, one_rank_run):
    export = one_rank_run / "export"
    for verb, args, key in (("ckpt", ("list", "s3://bucket/run"), "ROOT: s3://bucket/run"),
                            ("predict", ("--checkpoint", str(export), "--video", "clip.mp4", "s3://bucket/x.mp4",
                                         "--out", str(no_s3_credentials / "out")), "--video[1]: s3://bucket/x.mp4")):
        res = cli(verb, *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().startswith(f"vgpt {verb}: {key} is on S3 but no AWS credentials were found"), \
            res.stderr
