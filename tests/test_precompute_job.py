"""Acceptance of the latent-precompute farm, end to end on loopback: a Ray head
started here, the job submitted with the real `ray job submit` CLI, real mp4
files made with PyAV, a moto S3 server. One head serves every test (module fixture).

1. local dir: every valid video exactly once, latents decode to the frames an
   in-process encode of the same input gives, meta.json correct;
2. the same on S3 (and byte-identical to the local run);
3. crash (driver killed after its first commit) + resume with a worker and an
   encoder killed on the way, and one of two encoders failing to start: equal
   to the uninterrupted run, byte for byte;
4. bad inputs land in errors/ with their reason and are counted;
5. a rerun of a finished job encodes nothing and says so;
6. two Ray nodes (the head and a second `ray start` node, each with its own
   custom resource) both decode; the second node is killed mid-job and the job
   still finishes, equal to the uninterrupted run byte for byte;
7. a node that cannot set up the job (a real RuntimeEnvSetupError there, made by
   tests/refusing_node.py) gets no more work after its first, which goes to the
   head: no good video is rejected for a node's fault; a job that may decode
   only there fails, naming it.
Every job cuts videos longer than 16 frames into segments (harness SEGMENTS):
clip_a (20 frames) is stored as two samples, 16 + 4 frames.
"""
from __future__ import annotations

import json
import re
import threading
import time

import fsspec
import pytest
import torch
from precompute_harness import (
    BAD,
    GOOD,
    HEAD_RESOURCE,
    NODE_B_RESOURCE,
    RayHead,
    RayNode,
    make_inputs,
    read_dataset,
    read_errors,
)
from refusing_node import REFUSE_ON_NODES
from throttle_proxy import ThrottleProxy

from data.columns_file import map_columns
from data.dataset_index import DatasetMeta, read_index
from data.precompute_plan import make_key, source_key
from data.shard_format import committed_manifests, decode_sample
from data.videos import Videos
from jobconfig.precompute import VaeConfig, VideoConfig
from tests.runs import EARLY

pytestmark = pytest.mark.slow


def precompute_env(tmp) -> dict:
    """The inputs (real mp4s) and a Ray head on loopback, joinable by a second node (test 6): begun when
    collection ends, beside the quick tier (tests/conftest.py, runs.EARLY)."""
    inputs = tmp / "videos"
    good = make_inputs(inputs)
    head = RayHead(tmp, node_ip="127.0.0.2")
    return {"tmp": tmp, "inputs": inputs, "good": good, "head": head}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = EARLY.take("precompute", lambda: precompute_env(tmp_path_factory.mktemp("pc")))
    mp = pytest.MonkeyPatch()
    mp.setenv("VGPT_CACHE", str(env["tmp"] / "cache"))  # the tiny VAE, shared by the job and this process
    try:
        yield env
    finally:
        env["head"].stop()
        mp.undo()


@pytest.fixture(scope="module")
def full_run(env):
    """The uninterrupted run over the local inputs, to a local root."""
    root = env["tmp"] / "out-full"
    rc, out = env["head"].submit(f"--precompute.inputs.dir={env['inputs']}", f"--precompute.output.root={root}")
    assert rc == 0, out
    return str(root), out


def _valid_keys(env) -> dict[str, str]:
    return {make_key(str(p)): str(p) for p in env["good"].values()}


def test_local_dataset_every_valid_video_once_and_latents_decode(env, full_run):
    from data.vae import LatentVae
    from data.video import decode_video

    root, out = full_run
    fs = fsspec.filesystem("file")
    data = read_dataset(fs, root)
    # Each valid video once, nothing else; clip_a (20 frames > max_frames=16) as two segments.
    long_key = make_key(str(env["good"]["clip_a"]))
    assert sorted(data) == sorted([k for k in _valid_keys(env) if k != long_key]
                                  + [f"{long_key}-s0000", f"{long_key}-s0001"])
    index = read_index(fs, root)
    assert index["num_samples"] == len(GOOD) + 1 and index["num_shards"] == 5
    assert index["latent_channels"] == 4 and index["latent_dtype"] == "bfloat16"
    assert index["latent_form"] == "posterior"  # the default: per frame the posterior's mean and std, 2 x 4 channels
    assert index["vae"]["name"] == "tiny" and index["num_inputs"] == len(GOOD) + len(BAD)
    # the index records every sample's latents shape (its frame count first), as the tars hold them,
    # in one column: no second copy of the frame counts to disagree with it
    meta, manifests = DatasetMeta.load(fs, root), committed_manifests(fs, root)
    keys = [k for name in meta.names for k in manifests[name].keys]
    assert [meta.key(i) for i in range(meta.num_samples)] == keys
    recorded = {k: meta.sample_shape(i) for i, k in enumerate(keys)}
    cols = map_columns(f"{root}/{index['columns']['path']}")
    assert sorted(k for k in cols if k.startswith("sample_")) == ["sample_first_frame", "sample_frames", "sample_shape"]
    # ... and where each sample starts in its input, by which the loader groups clip_a's two segments into
    # one video (data/videos.py)
    assert cols["sample_first_frame"].tolist() == [16 if k.endswith("-s0001") else 0 for k in keys]
    videos = Videos.of(meta)
    assert videos.num == len(GOOD) and sorted(videos.frames.tolist()) == sorted(t for _, _, _, t, _, _ in GOOD)
    assert {k: list(decode_sample(m)[0].shape) for k, m in data.items()} == recorded
    assert meta.frames.tolist() == [recorded[k][0] for k in keys]

    vae = LatentVae(VaeConfig(path="tiny", batch_size=8))
    video_cfg = VideoConfig(max_image_size=128, min_frames=4)
    specs = {name: (w, h, t, fps) for name, w, h, t, fps, _ in GOOD}
    for key, uri in _valid_keys(env).items():
        parts = sorted(k for k in data if source_key(k) == key)
        decoded = [decode_sample(data[k], where=k) for k in parts]
        latents = torch.cat([lat for lat, _ in decoded])
        name = uri.rsplit("/", 1)[1][:-4]
        w, h, t, fps = specs[name]
        first = 0
        for k, (lat, meta) in zip(parts, decoded):
            # meta.json: source, geometry, fps, VAE facts, and where a segment sits in its video
            assert meta["source"] == uri and meta["key"] == k
            assert meta["source_size"] == [w, h] and meta["fps"] == fps and meta["num_frames"] == lat.shape[0]
            assert meta["frame_indices"] == list(range(first, first + lat.shape[0]))
            assert meta.get("first_frame", 0) == first and meta["source_frames"] == t
            if len(parts) > 1:
                assert meta["source_key"] == key and meta["num_segments"] == len(parts) == 2
            first += lat.shape[0]
        fw, fh = meta["frame_size"]
        assert fw % 16 == 0 and fh % 16 == 0 and max(meta["resized_size"]) <= 128
        assert meta["vae"]["sha256"] == index["vae"]["sha256"] and meta["scaling_factor"] == 0.13025
        assert latents.dtype == torch.bfloat16 and tuple(latents.shape) == (t, 8, fh // 8, fw // 8)
        assert meta["latent_form"] == "posterior" and (latents[:, 4:] > 0).all()  # mean, then std
        # The stored latents (segments concatenated) are the ones an in-process encode of the whole input gives ...
        frames = decode_video(uri, video_cfg).frames
        expect = vae.moments(frames)
        torch.testing.assert_close(latents.float(), expect, atol=2e-2, rtol=2e-2)
        # ... and their means decode back to the frames that in-process encode -> decode gives (tiny VAE quality).
        back, ref = vae.decode(latents[:, :4]), vae.decode(expect[:, :4])
        assert back.shape == (t, 3, fh, fw) and back.min() >= -1 and back.max() <= 1
        assert (back - ref).abs().mean() < 1e-2
    assert "[precompute] videos" in out and "frames/s" in out and "ETA" in out  # progress in the job log


def test_bad_inputs_quarantined_with_reason_and_counted(env, full_run):
    root, out = full_run
    fs = fsspec.filesystem("file")
    errors = read_errors(fs, root)
    expected = {make_key(str(env["inputs"] / name)): why for name, why in BAD.items()}
    assert sorted(errors) == sorted(expected)
    for key, why in expected.items():
        assert re.search(why, errors[key]["reason"]) and errors[key]["source"].endswith(".mp4")
    assert read_index(fs, root)["num_rejected"] == len(BAD)
    assert f"{len(BAD)} inputs rejected" in out and "rejected 6" in out


def test_rerun_of_finished_job_does_no_work(env, full_run):
    root, _ = full_run
    fs = fsspec.filesystem("file")
    before = {p: fs.cat_file(p) for p in fs.find(root)}
    rc, out = env["head"].submit(f"--precompute.inputs.dir={env['inputs']}", f"--precompute.output.root={root}")
    assert rc == 0, out
    assert "nothing to do: all 5 shards are already committed" in out
    assert "this run encoded 0 videos, 0 frames" in out and "encoder actor" not in out
    assert {p: fs.cat_file(p) for p in fs.find(root)} == before  # nothing rewritten differently


def test_s3_output_lands_under_prefix_and_reads_back(env, full_run, s3_bucket, s3_server):
    """Through a loopback proxy that answers the job's first requests with 503 SlowDown (issue 17,
    acceptance 4): the throttling costs retries, counted in the job's log, not the job."""
    fs, opts, bucket = s3_bucket
    root = f"{bucket}/latents/run1"
    aws = {k: "testing" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    with ThrottleProxy(s3_server) as proxy:
        proxy.throttle(5)
        rc, out = env["head"].submit(
            f"--precompute.inputs.dir={env['inputs']}", f"--precompute.output.root=s3://{root}",
            f"--precompute.output.storage_options={{endpoint_url: '{proxy.url}'}}",
            env={**aws, "AWS_DEFAULT_REGION": "us-east-1", "VGPT_STORAGE_BACKOFF": "base_s=0.01,cap_s=0.05"})
        assert rc == 0, out
        assert proxy.refused == 5 and "storage retries 5" in out and out.count("retrying in") == 5, out
    names = {p.rsplit("/", 1)[1] for p in fs.find(root)}
    assert {"index.json", "plan.json", "train-000000.tar", "train-000000.json"} <= names
    assert len(committed_manifests(fs, root)) == 5 and read_index(fs, root)["num_samples"] == len(GOOD) + 1
    assert sorted(read_errors(fs, root)) == sorted(read_errors(fsspec.filesystem("file"), full_run[0]))
    # Same inputs and dataset settings: the same bytes as the local run, sample by sample.
    assert read_dataset(fs, root) == read_dataset(fsspec.filesystem("file"), full_run[0])
    assert "testing" not in json.dumps(read_index(fs, root))  # no credentials leak into the dataset


def test_crash_and_resume_equals_uninterrupted_run(env, full_run):
    root = env["tmp"] / "out-crash"
    fs = fsspec.filesystem("file")
    args = (f"--precompute.inputs.dir={env['inputs']}", f"--precompute.output.root={root}")
    rc, out = env["head"].submit(*args, env={"VGPT_FAULT_KILL_AFTER_SHARDS": "1"})
    assert rc != 0 and "FAULT INJECTION" in out, out
    committed = committed_manifests(fs, str(root))
    # The driver dies right after its first commit (a second commit thread may just have finished too).
    assert 1 <= len(committed) < 5 and not (root / "index.json").exists()
    read_dataset(fs, str(root))  # every visible manifest matches a complete tar
    # A crash between tar upload and manifest leaves an orphan tar: it must not count as committed.
    orphan = next(f"train-{i:06d}" for i in range(5) if f"train-{i:06d}" not in committed)
    (root / "shards" / f"{orphan}.tar").write_bytes(b"partial upload")
    assert orphan not in committed_manifests(fs, str(root))

    # The resumed job asks for two encoders, and one of them fails to start (as on a node that cannot set up
    # the job): it goes on with the other, whose process the encoder fault then kills once (Ray restarts it).
    faults = env["tmp"] / "faults"
    rc, out = env["head"].submit(*args, "--precompute.ray.encode_actors=2", "--precompute.ray.encode_cpus=0.5",
                                 env={"VGPT_FAULT_DECODE_EXIT": str(faults), "VGPT_FAULT_ENCODER_EXIT": str(faults),
                                      "VGPT_FAULT_ENCODER_START": str(faults)})
    assert rc == 0, out
    assert f"{len(committed)} already committed, {5 - len(committed)} to do" in out
    assert (faults / "decode").exists() and (faults / "encoder").exists()  # both processes were killed
    assert (faults / "encoder-start").exists() and "1 encoder actor(s) ready" in out, out
    assert re.search(r"WARNING: encoder [01] did not start \(\w+Error: .+\); going on with the others", out), out
    full = full_run[0]
    assert read_dataset(fs, str(root)) == read_dataset(fs, full)
    for stem in committed_manifests(fs, full):
        assert (root / "shards" / f"{stem}.tar").read_bytes() == fs.cat_file(f"{full}/shards/{stem}.tar")
    assert read_errors(fs, str(root)).keys() == read_errors(fs, full).keys()
    got, want = read_index(fs, str(root)), read_index(fs, full)
    assert got == want


def test_two_nodes_share_the_work_and_losing_one_changes_nothing(env, full_run):
    """A second node joins the head; the driver pauses (fault switch) as soon as both nodes have
    decoded something, before the encode of that work is done; the test kills the second node
    (raylet, object store, its decode workers and encoder) and lets the job go on: lost frames are
    recomputed, its encoder restarts on the head, and the dataset equals the uninterrupted one-node
    run byte for byte."""
    head, tmp = env["head"], env["tmp"]
    node = RayNode(tmp, head)
    try:
        root, pause = tmp / "out-2nodes", tmp / "pause-2nodes"
        pause.mkdir()
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(done=head.submit(
            f"--precompute.inputs.dir={env['inputs']}", f"--precompute.output.root={root}",
            "--precompute.ray.encode_actors=2", "--precompute.ray.encode_cpus=0.5",
            "--precompute.ray.decode_cpus=0.5", "--precompute.ray.decode_in_flight=2",
            env={"VGPT_FAULT_PAUSE_NODES_DECODED": f"2:{pause}"})))
        job.start()
        for _ in range(1200):  # bounded wait for the driver's pause point (or its early end)
            if (pause / "paused.json").exists() or not job.is_alive():
                break
            time.sleep(0.1)
        done = result.get("done")
        assert (pause / "paused.json").exists(), done and (done[0], done[1][-4000:])  # the job's end, if it ended
        work = {r["resources"]: r for r in json.loads((pause / "paused.json").read_text()).values()}
        assert work[HEAD_RESOURCE]["decoded"] > 0 and work[NODE_B_RESOURCE]["decoded"] > 0, work
        node.kill()
        (pause / "resume").touch()
        job.join(600)
        rc, out = result["done"]
    finally:
        node.kill()
        (pause / "resume").touch()
    assert rc == 0, out
    assert re.search(r"\[vgpt_node_b\] decoded [1-9]", out), out  # the job log's work by node
    fs = fsspec.filesystem("file")
    full = full_run[0]
    assert read_dataset(fs, str(root)) == read_dataset(fs, full)
    for stem in committed_manifests(fs, full):
        assert (root / "shards" / f"{stem}.tar").read_bytes() == fs.cat_file(f"{full}/shards/{stem}.tar")
    assert read_index(fs, str(root)) == read_index(fs, full)


def test_a_node_that_cannot_set_up_the_job_gets_no_more_work_and_loses_nothing(env, full_run):
    """A node joins whose runtime-env agent fails to set up this job: Ray raises RuntimeEnvSetupError for
    what is sent there and does not retry it. The decode it refused goes back to the queue, the node gets no
    more work, and the dataset equals the uninterrupted run's: before, each video sent there was rejected for
    good as a bad video. A job that may decode only there fails at once, naming the node and why, instead of
    waiting for a node forever."""
    head, tmp = env["head"], env["tmp"]
    node = RayNode(tmp, head, resource="vgpt_node_refusing", refuse_jobs=True)
    try:
        root = tmp / "out-refused"
        # Encoders on the head (an encoder that cannot start is crash-resume's test, where it is certain).
        args = (f"--precompute.inputs.dir={env['inputs']}", "--precompute.ray.decode_cpus=0.5",
                "--precompute.ray.decode_in_flight=2", "--precompute.ray.encode_actors=2",
                "--precompute.ray.encode_cpus=0.5", f"--precompute.ray.encode_resources={{{HEAD_RESOURCE}: 0.5}}")
        rc, out = head.submit(*args, f"--precompute.output.root={root}", runtime_env=REFUSE_ON_NODES)
        # Decode work only on that node (its custom resource): the job cannot go on, and says so instead of waiting.
        rc_only, out_only = head.submit(*args, f"--precompute.output.root={tmp / 'out-refused-only'}",
                                        "--precompute.ray.decode_resources={vgpt_node_refusing: 1}",
                                        runtime_env=REFUSE_ON_NODES)
    finally:
        node.kill()
    assert rc_only != 0 and "RuntimeError: every decode node refused this job: " in out_only, out_only[-4000:]
    assert rc == 0, out
    assert re.search(r"WARNING: node \w+\[vgpt_node_refusing\] cannot run this job and gets no more work; its "
                     r"segments go to other nodes: RuntimeEnvSetupError", out), out
    assert "[vgpt_node_refusing] decoded 0 encoded 0 (refused the job: RuntimeEnvSetupError" in out, out
    fs = fsspec.filesystem("file")
    full = full_run[0]
    assert read_dataset(fs, str(root)) == read_dataset(fs, full)
    assert read_errors(fs, str(root)).keys() == read_errors(fs, full).keys()  # only the bad inputs
    assert read_index(fs, str(root)) == read_index(fs, full)
