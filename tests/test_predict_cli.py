"""`vgpt predict` on a real mp4 with a real export and a diffusers VAE (issue 9):
the outputs it promises, and clear errors for bad input (acceptance 4)."""
from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data.synthetic.videos import bouncing_square_frames, write_video
from jobconfig.model import ModelConfig
from orchestration.cli.predict import main as predict_main
from pretrain.checkpoint.export import save_export
from pretrain.model.videogpt import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    video = write_video(root / "clip.mp4", bouncing_square_frames(64, 10, seed=3), fps=8)
    model = build_model(ModelConfig())
    with torch.no_grad():  # give the zero-initialised head weights, so predictions are not constant
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
    export = save_export(model.state_dict(), root / "export", model.cfg, extra={"stage": "stage1"})
    return root, video, export


def run(setup, *args):
    root, video, export = setup
    return predict_main(["--checkpoint", str(export), "--video", str(video), "--vae", "tiny",
                         "--max-image-size", "64", "--out", str(root / "out"), "--predict.steps=3", *args])


def test_predict_writes_video_strip_and_metrics(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    root = setup[0]
    assert run(setup, "--context", "4", "--generate", "3") == 0
    out = root / "out" / "clip"
    with av.open(str(out / "prediction.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 4 + 3 and frames[0].shape == (64, 64, 3)
    with np.load(out / "frames.npz") as f:
        assert f["context"].shape == (4, 64, 64, 3) and f["prediction"].shape == (3, 64, 64, 3)
        assert f["truth"].shape == (3, 64, 64, 3)
    strip = Image.open(out / "strip.png")
    assert strip.width > 64 * 3 and strip.height > 64 * 2  # context, prediction, truth rows
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["psnr"]) == 3 and len(metrics["ssim"]) == 3
    assert len(metrics["baseline_repeat_last"]["psnr"]) == 3
    assert Image.open(out / "metrics.png").width > 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["videos"] == 1 and "mean_psnr" in summary and "fvd" not in summary


def test_predict_past_the_end_of_the_video_has_no_ground_truth(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    assert run(setup, "--context", "8", "--generate", "4") == 0  # 10 frames: 2 of truth
    metrics = json.loads((setup[0] / "out" / "clip" / "metrics.json").read_text())
    assert len(metrics["psnr"]) == 2


def test_video_shorter_than_the_context_is_a_clear_error(setup, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    assert run(setup, "--context", "20", "--generate", "2") == 2
    err = capsys.readouterr().err
    assert "clip.mp4" in err and "--context 20 needs at least 20" in err


def test_export_of_another_model_size_is_refused(setup, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "s1.yaml"
    cfg.write_text("model:\n  preset: s1\n")
    assert run(setup, "--context", "2", "--generate", "1", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "exported with model.hidden_size=64" in err and "another model size" in err


def test_vae_with_other_latent_channels_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    video = write_video(tmp_path / "v.mp4", bouncing_square_frames(64, 6), fps=8)
    model = build_model(ModelConfig(latent_channels=8))
    export = save_export(model.state_dict(), tmp_path / "m.safetensors", model.cfg)
    rc = predict_main(["--checkpoint", str(export), "--video", str(video), "--vae", "tiny", "--context", "2",
                       "--generate", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "4 latent channels" in capsys.readouterr().err


def test_missing_recipe_and_broken_export_are_clear_errors(setup, tmp_path, capsys):
    _, video, export = setup
    rc = predict_main(["--checkpoint", str(export), "--video", str(video), "--context", "2", "--generate", "1"])
    assert rc == 2 and "pass --vae" in capsys.readouterr().err
    weights = export / "diffusion_pytorch_model.safetensors"
    broken = tmp_path / "broken.safetensors"  # the older single-file layout
    broken.write_bytes(weights.read_bytes()[:100])
    rc = predict_main(["--checkpoint", str(broken), "--video", str(video), "--vae", "tiny", "--context", "2",
                       "--generate", "1"])
    assert rc == 2 and "not a safetensors export" in capsys.readouterr().err
    shutil.copytree(export, tmp_path / "broken")
    (tmp_path / "broken" / weights.name).write_bytes(weights.read_bytes()[:100])
    rc = predict_main(["--checkpoint", str(tmp_path / "broken"), "--video", str(video), "--vae", "tiny",
                       "--context", "2", "--generate", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and f"{tmp_path / 'broken' / weights.name}: not a readable safetensors file" in \
        capsys.readouterr().err


def test_predict_reads_a_video_from_object_storage(setup, s3_bucket, s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)  # the endpoint as botocore reads it; keys from env
    fs, _, bucket = s3_bucket
    _, video, export = setup
    fs.put(str(video), f"{bucket}/videos/remote.mp4")
    rc = predict_main(["--checkpoint", str(export), "--video", f"s3://{bucket}/videos/remote.mp4", "--vae", "tiny",
                       "--max-image-size", "64", "--context", "3", "--generate", "2", "--out", str(tmp_path / "o"),
                       "--predict.steps=2"])
    assert rc == 0
    metrics = json.loads((tmp_path / "o" / "remote" / "metrics.json").read_text())
    assert metrics["video"] == f"s3://{bucket}/videos/remote.mp4" and len(metrics["psnr"]) == 2


def test_history_is_reencoded_by_default_and_latent_on_request(setup, monkeypatch, tmp_path):
    """Three one-frame clips: from the second on the default re-encodes the decoded history (the authors'
    pipeline); --predict.history=latent appends the sampled latents. The first frame is the same."""
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    root, video, export = setup
    made = {}
    for history in ("reencode", "latent"):
        out = tmp_path / history
        extra = [] if history == "reencode" else ["--predict.history=latent"]
        assert predict_main(["--checkpoint", str(export), "--video", str(video), "--vae", "tiny", "--max-image-size",
                             "64", "--out", str(out), "--predict.steps=2", "--predict.clip_frames=1", "--context", "3",
                             "--generate", "3", *extra]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["predict"]["history"] == history and summary["predict"]["noise_seed"] == "same"
        with np.load(out / "clip" / "frames.npz") as f:
            made[history] = f["prediction"].astype(int)
    assert np.array_equal(made["reencode"][0], made["latent"][0])
    assert np.abs(made["reencode"][1:] - made["latent"][1:]).max() > 0
