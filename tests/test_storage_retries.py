"""Storage that rides out throttling (data/object_store.py), against the moto S3 server
(tests/conftest.py) behind a loopback proxy that answers the first N requests
with a real S3 throttling response, 503 SlowDown (tests/throttle_proxy.py).

Every refused request must be followed by exactly one retry, so the retries
counted (`retry_count()`) and logged ("[storage] throttled: ...") equal what the
proxy refused; the attempts and the time are bounded; the retry hook survives
s3fs re-creating its client; credentials never reach the log. The loader, the
precompute job's outputs and the checkpoint tools are tested through the
project's own call sites (the whole Ray precompute job through the proxy:
tests/test_precompute_job.py)."""
from __future__ import annotations

import logging
import pickle

import fsspec
import pytest
from throttle_proxy import ThrottleProxy

from data.object_store import (
    BACKOFF_ENV,
    Backoff,
    RetryingS3FileSystem,
    open_fs,
    retry_count,
    retrying,
    storage_options,
)

FAST = Backoff(base_s=0.005, cap_s=0.02)  # the real policy, with waits short enough for a test
SECRET = "vgpt-storage-secret-never-logged"
BURST = 6


@pytest.fixture
def proxy(s3_server, s3_bucket, monkeypatch, caplog):
    """(proxy in front of moto refusing nothing yet, bucket, client options through the proxy)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv(BACKOFF_ENV, "base_s=0.005,cap_s=0.02")  # for call sites that take the default policy
    caplog.set_level(logging.WARNING, logger="data.object_store")
    with ThrottleProxy(s3_server) as p:
        yield p, s3_bucket[2], {"client_kwargs": {"endpoint_url": p.url}, "use_listings_cache": False,
                                "skip_instance_cache": True}


def retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]


def test_writes_and_reads_ride_out_a_burst_and_every_retry_is_counted(proxy, caplog):
    p, bucket, opts = proxy
    fs, root = open_fs(f"s3://{bucket}/data/", opts, FAST)
    assert isinstance(fs, RetryingS3FileSystem) and root == f"{bucket}/data"
    body = bytes(range(256)) * 1024  # 256 KiB
    before = retry_count()
    p.throttle(BURST)
    fs.pipe_file(f"{root}/obj.bin", body)  # PutObject refused BURST times in a row
    p.throttle(BURST, when=lambda method, path: method == "GET")
    assert fs.cat_file(f"{root}/obj.bin") == body
    p.throttle(BURST)
    with fs.open(f"{root}/obj.bin", "rb", block_size=1 << 16) as f:  # a ranged, streaming read
        f.seek(100_000)
        assert f.read(1000) == body[100_000:101_000]
    assert p.refused == 3 * BURST
    assert retry_count() - before == p.refused  # one retry per refusal: no more, no fewer
    lines = retry_lines(caplog)
    assert len(lines) == p.refused
    assert sum(f"throttled: 503 SlowDown on PutObject s3://{bucket}/data/obj.bin" in s for s in lines) == BURST
    assert sum(f"throttled: 503 SlowDown on GetObject s3://{bucket}/data/obj.bin" in s for s in lines) == 2 * BURST
    assert f"(attempt {BURST + 1}/{FAST.max_attempts})" in lines[BURST - 1]
    assert SECRET not in caplog.text


def test_attempts_are_bounded_and_a_whole_operation_is_retried_past_them(proxy, caplog):
    p, bucket, opts = proxy
    fs, root = open_fs(f"s3://{bucket}/b", opts, Backoff(base_s=0.005, cap_s=0.02, max_attempts=2))
    fs.pipe_file(f"{root}/x", b"payload")
    p.throttle(10**6)
    with pytest.raises(OSError) as e:
        fs.cat_file(f"{root}/x")
    assert p.refused == 2 and e.value.errno == 16  # s3fs: SlowDown -> OSError(EBUSY) once botocore gave up
    assert "giving up: throttled: 503" in caplog.text
    # botocore gives up after 2 attempts; `retrying` runs the whole read again, each retry counted once
    p.throttle(3)
    refused, before = p.refused, retry_count()
    assert retrying(lambda: fs.cat_file(f"{root}/x"), f"object s3://{bucket}/b/x", FAST) == b"payload"
    assert p.refused - refused == 3 and retry_count() - before == 3
    assert f"on object s3://{bucket}/b/x (attempt 2/10)" in caplog.text
    # and `retrying` is bounded too: it stops after its own attempts, naming the object
    p.throttle(10**6)
    with pytest.raises(OSError, match=f"object s3://{bucket}/b/x: failed 3 time"):
        retrying(lambda: fs.cat_file(f"{root}/x"), f"object s3://{bucket}/b/x", Backoff(0.005, 0.02, 120, 3))


def test_not_found_is_not_retried_and_time_is_bounded():
    calls = []

    def missing():
        calls.append(1)
        return fsspec.filesystem("memory").cat_file("/no/such/object")

    with pytest.raises(FileNotFoundError):
        retrying(missing, "object memory://no/such/object", FAST)
    assert len(calls) == 1  # says something about the data: never retried

    def busy():
        calls.append(1)
        raise OSError(16, "Please reduce your request rate.")

    calls.clear()
    with pytest.raises(OSError, match="failed 1 time"):
        retrying(busy, "x", Backoff(base_s=1.0, cap_s=1.0, total_s=0.0))  # no retry would fit in the budget
    assert len(calls) == 1


def test_backoff_from_the_environment(monkeypatch):
    monkeypatch.delenv(BACKOFF_ENV, raising=False)
    assert Backoff.from_env() == Backoff(base_s=0.1, cap_s=10.0, total_s=120.0, max_attempts=10)
    monkeypatch.setenv(BACKOFF_ENV, "total_s=600, max_attempts=20")
    assert Backoff.from_env() == Backoff(total_s=600.0, max_attempts=20)
    for bad in ("total=600", "base_s=fast", "base_s=0"):
        monkeypatch.setenv(BACKOFF_ENV, bad)
        with pytest.raises(ValueError, match=BACKOFF_ENV):
            Backoff.from_env()


def test_hook_survives_client_recreation_and_options_stay_plain(proxy, caplog):
    p, bucket, opts = proxy
    fs, root = open_fs(f"s3://{bucket}/c", opts, FAST)
    fs.pipe_file(f"{root}/x", b"1")
    fs.connect(refresh=True)  # s3fs makes a new session and client (as after a closed connection pool)
    before = retry_count()
    p.throttle(2)
    assert fs.cat_file(f"{root}/x") == b"1"
    assert p.refused == 2 and retry_count() - before == 2
    clone = pickle.loads(pickle.dumps(fs))  # what Ray does with a filesystem
    assert isinstance(clone, RetryingS3FileSystem) and clone.retry_backoff == FAST
    # options: plain dicts (Ray ships them), the user's config_kwargs win, non-S3 URLs untouched
    user = {"config_kwargs": {"read_timeout": 5, "retries": {"mode": "adaptive"}}, "anon": False}
    got = storage_options("s3://b/x", user)
    assert got == {"anon": False, "config_kwargs": {"read_timeout": 5, "retries": {
        "mode": "adaptive", "total_max_attempts": Backoff().max_attempts}}}
    assert user == {"config_kwargs": {"read_timeout": 5, "retries": {"mode": "adaptive"}}, "anon": False}
    assert "total_max_attempts" not in storage_options("s3://b", {"config_kwargs": {"retries": {"max_attempts": 3}}}
                                                       )["config_kwargs"]["retries"]
    assert storage_options("/local/dir", {"auto_mkdir": True}) == {"auto_mkdir": True}
    assert pickle.loads(pickle.dumps(got)) == got


def test_loader_rides_out_a_burst(proxy, s3_bucket, caplog):
    from data.loader import LatentLoader
    from data.synthetic.shards import video_of, write_toy_dataset
    from jobconfig.data import DataConfig, StageSamplingConfig

    p, bucket, opts = proxy
    root, sizes = f"s3://{bucket}/latents", [3, 4, 2]
    write_toy_dataset(root, sizes, frames=6, storage_options=s3_bucket[1])  # straight to moto
    cfg = DataConfig(root=root, storage_options=opts, seed=1, shuffle_buffer=2, batch_size=2, epochs=1,
                     num_workers=0, stage=StageSamplingConfig(frames=3, interval="random", interval_min=1,
                                                              interval_max=2, clips="random"))
    before = retry_count()
    p.throttle(BURST)
    got = [(g, key) for batch in LatentLoader(cfg, 0, 1) for g, key, *_ in batch.samples()]
    assert sorted(video_of(key) for g, key in got if g < sum(sizes)) == list(range(sum(sizes)))  # each once
    assert p.refused == BURST and retry_count() - before == BURST and len(retry_lines(caplog)) == BURST


def test_precompute_outputs_ride_out_a_burst(proxy, caplog):
    from data.dataset_index import read_index
    from data.shard_format import committed_manifests, get_fs, write_error
    from data.synthetic.shards import write_toy_dataset

    p, bucket, opts = proxy
    root = f"s3://{bucket}/out"
    before = retry_count()
    p.throttle(BURST)
    index = write_toy_dataset(root, [2, 3], frames=4, storage_options=opts)  # the job's commit: tar, manifest, index
    fs, path = get_fs(root, opts)
    p.throttle(BURST)
    write_error(fs, path, "bad_clip", "s3://in/bad.mp4", "cannot decode")
    p.throttle(BURST)
    assert sorted(committed_manifests(fs, path)) == ["train-000000", "train-000001"]
    assert read_index(fs, path) == index and index["num_samples"] == 5
    assert b"cannot decode" in fs.cat_file(f"{path}/errors/bad_clip.json")
    assert p.refused == 3 * BURST and retry_count() - before == p.refused == len(retry_lines(caplog))


def test_checkpoint_tools_ride_out_a_burst(proxy, s3_bucket, tmp_path, caplog):
    from pretrain.checkpoint.integrity import write_manifest
    from pretrain.checkpoint.storage import CheckpointStore

    p, bucket, _ = proxy
    ckpt = tmp_path / "ck" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.bin").write_bytes(bytes(range(256)) * 256)
    (ckpt / "trainer_state.json").write_text('{"step": 1}')
    write_manifest(ckpt, 1)
    (tmp_path / "ck" / "latest").write_text("step_00000001")
    s3_bucket[0].put(str(tmp_path / "ck"), f"{bucket}/run/checkpoints", recursive=True)
    before = retry_count()
    p.throttle(BURST)
    store = CheckpointStore.of_run(f"s3://{bucket}/run", endpoint_url=p.url)
    assert store.tags() == ["step_00000001"] and store.latest() == "step_00000001"
    p.throttle(BURST)
    assert store.verify("step_00000001") == []
    p.throttle(BURST)
    assert store.fetch("step_00000001", tmp_path / "copy") == []
    assert (tmp_path / "copy" / "model.bin").read_bytes() == (ckpt / "model.bin").read_bytes()
    assert p.refused == 3 * BURST and retry_count() - before == p.refused
    assert SECRET not in caplog.text
