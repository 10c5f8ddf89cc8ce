"""Unit tests of the precompute farm's pieces: config, video geometry/sampling/
rejection, the VAE wrapper, the deterministic plan, progress lines."""
from __future__ import annotations

import dataclasses
import json

import fsspec
import numpy as np
import pytest
import torch

from data.precompute_plan import (
    PlanError,
    build_plan,
    config_hash,
    list_inputs,
    make_key,
    plan_growth,
    plan_hash,
    record_generation,
)
from data.synthetic.videos import pattern_frames, write_video
from data.video import VideoRejected, check_source, decode_video, target_geometry
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from jobconfig.precompute import OutputConfig, PrecomputeConfig, VaeConfig, VideoConfig
from orchestration.precompute.progress import Progress


# ---------------------------------------------------------------- config
def test_precompute_configs_load_and_bad_values_name_the_key():
    tiny = load_config("configs/precompute/tiny.yaml").precompute
    assert tiny.vae.path == "tiny" and tiny.inputs.dir and tiny.output.videos_per_shard == 2
    sdxl = load_config("configs/precompute/sdxl.yaml").precompute
    assert sdxl.video.max_image_size == 320 and sdxl.output.root.startswith("s3://") and sdxl.vae.dtype == "fp32"
    assert sdxl.latents == tiny.latents == "posterior" and sdxl.output.latent_dtype == "bf16"
    cases = {"--precompute.inputs.glob=/x/*.mp4": "precompute.inputs.dir/glob/list_file",
             "--precompute.output.videos_per_shard=0": "precompute.output.videos_per_shard",
             "--precompute.vae.dtype=fp8": "precompute.vae.dtype",
             "--precompute.output.storage_options={aws_secret_access_key: x}": "credentials are not allowed",
             "--precompute.video.max_aspect=0.5": "precompute.video.max_aspect",
             "--precompute.ray.encode_actorz=2": "unknown config key 'precompute.ray.encode_actorz'",
             "--precompute.ray.decode_resources={CPU: 1}": "precompute.ray.decode_resources.CPU",
             "--precompute.video.segment_overlap=-1": "precompute.video.segment_overlap",
             "--precompute.latents=mean": "precompute.latents"}
    for override, expect in cases.items():
        with pytest.raises(ConfigError, match=expect.replace(".", r"\.").replace("{", r"\{")):
            load_config("configs/precompute/tiny.yaml", [override])


def test_config_hash_covers_dataset_settings_only():
    a = PrecomputeConfig()
    b = dataclasses.replace(a, ray=dataclasses.replace(a.ray, encode_actors=8), progress_every_s=1.0)
    c = dataclasses.replace(a, video=dataclasses.replace(a.video, max_image_size=256))
    assert config_hash(a) == config_hash(b) != config_hash(c)


# ---------------------------------------------------------------- video
@pytest.mark.parametrize("size, max_side, resized, crop", [
    ((320, 180), 320, (320, 180), (0, 2, 320, 178)),  # METHOD.md: 320x176 frames
    ((1920, 1080), 320, (320, 180), (0, 2, 320, 178)),
    ((160, 128), 128, (128, 102), (0, 3, 128, 99)),
    ((256, 144), 320, (256, 144), (0, 0, 256, 144)),  # never upscaled
])
def test_geometry_resize_then_center_crop_to_16(size, max_side, resized, crop):
    g = target_geometry(*size, max_side)
    assert g.resized == resized and g.crop == crop and all(s % 16 == 0 for s in g.size)


def test_source_rejections():
    cfg = VideoConfig()
    check_source(512, 128, cfg)  # exactly 4:1 and 128 px are allowed
    with pytest.raises(VideoRejected, match="too small: 127x200"):
        check_source(127, 200, cfg)
    with pytest.raises(VideoRejected, match="aspect ratio 5.00:1"):
        check_source(640, 128, cfg)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    frames = pattern_frames(256, 144, 12, seed=3)
    write_video(path, frames, fps=30)
    return path, frames


def test_decode_matches_source_frames(clip):
    path, src = clip
    v = decode_video(str(path), VideoConfig(max_image_size=320, min_frames=4))
    assert v.frames.shape == (12, 144, 256, 3) and v.frames.dtype == np.uint8
    assert v.fps == 30 and v.frame_indices == list(range(12)) and v.meta["source_size"] == [256, 144]
    err = np.abs(v.frames.astype(int) - src.astype(int)).mean()
    assert err < 8  # codec loss only (4:2:0 chroma on sharp colour edges) ...
    assert np.abs(v.frames.astype(int) - src[::-1].astype(int)).mean() > 2 * err  # ... and frame order kept
    small = decode_video(str(path), VideoConfig(max_image_size=128, min_frames=4))
    assert small.frames.shape == (12, 64, 128, 3) and small.meta["crop_box"] == [0, 4, 128, 68]


def test_frame_sampling_by_stride_fps_and_cap(clip):
    path, _ = clip
    by_stride = decode_video(str(path), VideoConfig(stride=2, min_frames=1))
    assert by_stride.frame_indices == [0, 2, 4, 6, 8, 10] and by_stride.fps == 15
    by_fps = decode_video(str(path), VideoConfig(sample_fps=10, min_frames=1))
    assert by_fps.frame_indices == [0, 3, 6, 9] and by_fps.fps == 10
    capped = decode_video(str(path), VideoConfig(max_frames=5, min_frames=1, long_videos="truncate"))
    assert capped.frames.shape[0] == 5 and capped.meta["truncated"] and capped.num_segments == 1
    with pytest.raises(VideoRejected, match="too few frames: 4 sampled from 12 decoded"):
        decode_video(str(path), VideoConfig(sample_fps=10, min_frames=5))


def test_unreadable_inputs_are_rejections_not_crashes(tmp_path, clip):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello")
    data = clip[0].read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 3])
    for name, why in [("empty.mp4", "empty file"), ("text.mp4", "not a readable video"),
                      ("trunc.mp4", "not a readable video|decode error"), ("missing.mp4", "file not found")]:
        with pytest.raises(VideoRejected, match=why):
            decode_video(str(tmp_path / name), VideoConfig(min_frames=1))


# ---------------------------------------------------------------- VAE
@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    from data.vae import save_tiny_vae

    tmp = tmp_path_factory.mktemp("vae")
    return save_tiny_vae(tmp / "plain"), save_tiny_vae(tmp / "shifted", seed=1, shift_factor=0.1)


def test_vae_encode_scaling_shift_and_decode(vae_dirs, clip):
    from data.vae import LatentVae

    frames = decode_video(str(clip[0]), VideoConfig(max_image_size=128, min_frames=1)).frames[:5]
    vae = LatentVae(VaeConfig(path=str(vae_dirs[1]), sample="mode", batch_size=2))
    assert vae.shift_factor == 0.1 and vae.identity["downsample"] == 8
    z = vae.encode(frames, "k")
    assert z.shape == (5, 4, 8, 16)
    from data.video import to_model_input
    with torch.no_grad():
        dist = vae.vae.encode(to_model_input(frames)).latent_dist
        torch.testing.assert_close(z, (dist.mean - 0.1) * vae.scaling_factor, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vae.decode(z), vae.vae.decode(dist.mean).sample.clamp(-1, 1),
                                   atol=1e-4, rtol=1e-4)


def test_vae_sampling_is_seeded_per_frame(vae_dirs, clip):
    from data.vae import LatentVae, vae_identity

    frames = decode_video(str(clip[0]), VideoConfig(max_image_size=128, min_frames=1)).frames
    one = LatentVae(VaeConfig(path=str(vae_dirs[0]), batch_size=1))
    many = LatentVae(VaeConfig(path=str(vae_dirs[0]), batch_size=8))
    mode = LatentVae(VaeConfig(path=str(vae_dirs[0]), sample="mode"))
    z1, z8 = one.encode(frames, "key-a"), many.encode(frames, "key-a")
    torch.testing.assert_close(z1, z8, atol=1e-5, rtol=1e-5)  # same noise whatever the batching
    assert torch.equal(z8, many.encode(frames, "key-a"))  # reruns are bit-identical
    assert not torch.allclose(z8, many.encode(frames, "key-b"))  # another video draws other noise
    assert not torch.allclose(z8, mode.encode(frames, "key-a"))  # sample() is not the mean
    bf16 = LatentVae(VaeConfig(path=str(vae_dirs[0]), dtype="bf16", batch_size=8))
    assert (bf16.encode(frames, "key-a") - z8).abs().mean() < 0.05 * z8.abs().mean() + 1e-3
    assert vae_identity(vae_dirs[0], "a")["sha256"] != vae_identity(vae_dirs[1], "a")["sha256"]


def test_vae_moments_are_the_scaled_posterior_of_which_encode_is_a_draw(vae_dirs, clip):
    """The posterior form: mean and std scaled alike, so mean + std * n is the scaled sample() encode
    stores for the same n (the fixed per-frame draw of the `sample` form)."""
    from data.vae import LatentVae, frame_seed
    from data.video import to_model_input

    frames = decode_video(str(clip[0]), VideoConfig(max_image_size=128, min_frames=1)).frames[:5]
    vae = LatentVae(VaeConfig(path=str(vae_dirs[1]), batch_size=2))  # shift_factor 0.1
    moments = vae.moments(frames)
    assert moments.shape == (5, 8, 8, 16)
    mean, std = moments[:, :4], moments[:, 4:]
    with torch.no_grad():
        dist = vae.vae.encode(to_model_input(frames)).latent_dist
    s = vae.scaling_factor
    torch.testing.assert_close(mean, (dist.mean - 0.1) * s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, dist.std * s, atol=1e-7, rtol=1e-4)
    n = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(frame_seed(0, "k", i)))
                     for i in range(5)])
    torch.testing.assert_close(mean + std * n, vae.encode(frames, "k"), atol=1e-5, rtol=1e-4)


def test_encoder_writes_the_posterior_form_by_default_and_one_draw_on_request(vae_dirs, clip, monkeypatch):
    """The encoder actor's sample (in process: no Ray job): 2C channels of moments and latent_form in
    meta.json by default; `precompute.latents: sample` stores the draw, C channels, as before."""
    import ray

    from data.shard_format import decode_sample
    from orchestration.precompute import workers

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(workers, "_node", lambda: "node-0")
    frames = decode_video(str(clip[0]), VideoConfig(max_image_size=128, min_frames=1)).frames[:4]
    status = {"key": "k", "sample_key": "k", "first_frame": 0, "fps": 30.0, "frame_indices": [0, 1, 2, 3],
              "meta": {}, "num_segments": 1}
    vae_cfg = VaeConfig(path=str(vae_dirs[0]), device="cpu")
    assert PrecomputeConfig().latents == "posterior"
    out = {}
    for form in ("posterior", "sample"):
        enc = workers.Encoder(vae_cfg, "bf16", form) if form == "sample" else workers.Encoder(vae_cfg, "bf16")
        sample = enc.encode(status, "file:///clip.mp4", frames)
        out[form], meta = decode_sample(sample["members"])
        assert meta["latent_form"] == form and out[form].dtype == torch.bfloat16
        assert sample["shape"] == list(out[form].shape) == [4, 8 if form == "posterior" else 4, 8, 16]
    ref = enc.vae.moments(frames)
    torch.testing.assert_close(out["posterior"].float(), ref, atol=1e-2, rtol=1e-2)  # bf16 storage
    assert (out["posterior"][:, 4:] > 0).all()  # the spread is a std
    torch.testing.assert_close(out["sample"].float(), enc.vae.encode(frames, "k"), atol=2e-2, rtol=2e-2)
    # a dataset written before the choice existed (one draw) keeps its config hash; the posterior form differs
    sample_cfg = dataclasses.replace(PrecomputeConfig(), latents="sample")
    assert "latents" not in sample_cfg.dataset_dict() and config_hash(sample_cfg) != config_hash(PrecomputeConfig())


# ---------------------------------------------------------------- plan
def test_keys_are_stable_ids_without_dots():
    k = make_key("/data/a b/My.Video.v2.mp4")
    assert k.startswith("My_Video_v2-") and "." not in k and k == make_key("/data/a b/My.Video.v2.mp4")
    assert make_key("/x/clip.mp4") != make_key("/y/clip.mp4") and make_key("s3://b/clip.mp4").startswith("clip-")


def test_inputs_from_dir_glob_and_list_file_and_plan(tmp_path):
    from jobconfig.precompute import InputsConfig

    for name in ("b.mp4", "a.MKV", "sub/c.webm", "notes.txt", ".hidden.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    by_dir = list_inputs(InputsConfig(dir=str(tmp_path)))
    assert [p.rsplit("/", 1)[1] for p in by_dir] == ["a.MKV", "b.mp4", "c.webm"]
    assert list_inputs(InputsConfig(glob=str(tmp_path / "*.mp4"))) == [str(tmp_path / "b.mp4")]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# inputs\n{tmp_path}/b.mp4\n\n{tmp_path}/a.MKV\n{tmp_path}/b.mp4\n")
    assert list_inputs(InputsConfig(list_file=str(lst))) == sorted([f"{tmp_path}/a.MKV", f"{tmp_path}/b.mp4"])
    plan = build_plan([f"/v/{i}.mp4" for i in range(5)], "train", 2)
    assert [s.stem for s in plan] == ["train-000000", "train-000001", "train-000002"]
    assert [len(s.items) for s in plan] == [2, 2, 1] and plan == build_plan([f"/v/{i}.mp4" for i in range(5)], "train", 2)
    with pytest.raises(PlanError, match="not a directory"):
        list_inputs(InputsConfig(dir=str(tmp_path / "nope")))


def test_plan_of_before_generations_is_adopted_or_refused(tmp_path):
    # a plan.json of format 1 (one plan hash, no generations): adopted as generation 1 by a job over
    # exactly its inputs, so that the root can grow; other inputs are refused (tests/test_dataset_growth.py)
    fs = fsspec.filesystem("file")
    cfg = PrecomputeConfig(output=OutputConfig(videos_per_shard=1))
    listed = ["/v/a.mp4", "/v/b.mp4"]
    h = plan_hash(build_plan(listed, "train", 1), config_hash(cfg))
    (tmp_path / "plan.json").write_text(json.dumps({"plan_hash": h, "config_hash": config_hash(cfg), "num_inputs": 2}))
    with pytest.raises(PlanError, match="inputs or the dataset settings changed.*exactly its original inputs"):
        plan_growth(fs, str(tmp_path), listed + ["/v/c.mp4"], cfg)
    plan = plan_growth(fs, str(tmp_path), listed, cfg)
    assert [s.stem for s in plan.new] == ["train-000000", "train-000001"] and plan.record
    record_generation(fs, str(tmp_path), plan)
    assert json.loads((tmp_path / "plan.json").read_text())["format"] == 2
    assert [s.stem for s in plan_growth(fs, str(tmp_path), listed + ["/v/c.mp4"], cfg).new] == ["train-000002"]


def test_a_root_of_one_draw_per_frame_grows_only_in_that_form(tmp_path):
    """A root written before `precompute.latents` (one draw per frame: its settings have no `latents`) is
    refused by a job of the new default, posterior, with the way out; with `latents: sample` it grows."""
    fs = fsspec.filesystem("file")
    old = PrecomputeConfig(output=OutputConfig(videos_per_shard=1), latents="sample")
    record_generation(fs, str(tmp_path), plan_growth(fs, str(tmp_path), ["/v/a.mp4"], old))
    new = dataclasses.replace(old, latents="posterior")
    with pytest.raises(PlanError, match="one posterior draw per frame .* grow it with --precompute.latents=sample"):
        plan_growth(fs, str(tmp_path), ["/v/a.mp4", "/v/b.mp4"], new)
    assert [s.stem for s in plan_growth(fs, str(tmp_path), ["/v/a.mp4", "/v/b.mp4"], old).new] == ["train-000001"]


def test_progress_line_reports_rate_eta_and_rejections():
    now = [0.0]
    p = Progress(10, 2, 5, 1, every_s=5, clock=lambda: now[0])
    p.video(frames=30)
    p.video(rejected=True)
    now[0] = 2.0
    line = p.line()
    assert "videos 4/10 (this run 2)" in line and "rejected 1" in line and "15.0 frames/s" in line
    assert "ETA 0:00:06" in line and "shards 1/5" in line


def test_cli_knows_precompute():
    from orchestration.cli import SUBCOMMANDS

    assert SUBCOMMANDS["precompute"][0] == "orchestration.cli.precompute"


def test_inputs_listed_and_decoded_from_s3(s3_bucket, clip):
    from jobconfig.precompute import InputsConfig

    fs, opts, bucket = s3_bucket
    fs.put_file(str(clip[0]), f"{bucket}/raw/a/clip.mp4")
    fs.pipe_file(f"{bucket}/raw/readme.txt", b"x")
    uris = list_inputs(InputsConfig(glob=f"s3://{bucket}/raw/**/*.mp4", storage_options=opts))
    assert uris == [f"s3://{bucket}/raw/a/clip.mp4"]
    assert list_inputs(InputsConfig(dir=f"s3://{bucket}/raw", storage_options=opts)) == uris
    video = decode_video(uris[0], VideoConfig(min_frames=1), opts)
    local = decode_video(str(clip[0]), VideoConfig(min_frames=1))
    assert np.array_equal(video.frames, local.frames) and make_key(uris[0]) != make_key(str(clip[0]))
