"""`vgpt train --config configs/pretrain.yaml` runs the four stages end to end on a
tiny latent dataset, each starting from the previous stage's export."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export_pretrained import load_in_fresh_process

from data.synthetic.shards import write_toy_dataset
from pretrain.checkpoint.export import read_export_tensors, weights_fingerprint
from tests.runs import env

REPO = Path(__file__).resolve().parents[1]


def run_pretrain(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestration.cli", "train", "--config", str(REPO / "configs/pretrain.yaml"),
           "--model.preset=debug", "--model.attention=blockwise", f"--data.root={tmp_path / 'latents'}",
           "--data.num_workers=0", "--train.steps=2", "--train.warmup_scheduler_steps=0", "--train.log_every=1",
           "--train.tensorboard=false", f"--train.out_dir={tmp_path / 'run'}", "--parallel.precision=fp32",
           "--parallel.sequence_parallel=1", "--parallel.activation_checkpointing=false", *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.mark.slow
def test_four_stages_chain_through_exports(tmp_path):
    # stage 4 samples 80 frames at interval >= 4: videos need at least 317 stored frames
    write_toy_dataset(str(tmp_path / "latents"), [3, 2], frames=330, shape=(4, 4, 4))
    res = run_pretrain(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "stage4" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for i in range(1, 5):
        assert (run / f"stage{i}" / "export" / "config.json").is_file(), f"stage {i} exported nothing"
        assert f"[stage{i}] step      2/2" in res.stdout
    for i in range(2, 5):
        init = json.loads((run / f"stage{i}" / "init.json").read_text())
        previous = read_export_tensors(run / f"stage{i - 1}" / "export")
        assert init["init_from"].endswith(f"stage{i - 1}/export")
        assert init["weights_sha256"] == weights_fingerprint(previous), f"stage {i} did not start from stage {i - 1}"
    # stages differ by data: stage 1 is next-frame (one frame per clip), stage 4 uses 80 frames
    assert weights_fingerprint(read_export_tensors(run / "stage1/export")) != \
        weights_fingerprint(read_export_tensors(run / "stage4/export"))
    # a stage export is a from_pretrained directory: diffusers and our model class alone load it, bitwise
    got = load_in_fresh_process(run / "stage4/export", tmp_path / "loaded.safetensors")
    assert got["provenance"]["stage"] == "stage4" and got["provenance"]["init_from"].endswith("stage3/export")
    loaded, written = load_file(str(tmp_path / "loaded.safetensors")), read_export_tensors(run / "stage4/export")
    assert all(torch.equal(loaded[k], written[k]) for k in written)


def test_frames_beyond_the_token_limit_fail_before_training(tmp_path):
    write_toy_dataset(str(tmp_path / "latents"), [2], frames=330, shape=(4, 4, 4))
    res = run_pretrain(tmp_path, "--data.stage.max_tokens=400", "--model.max_tokens=400")
    assert res.returncode == 2
    # random clips of 80 frames take at least 81 frame copies of 4 + 2 tokens: the loader's bound (data/buckets.py)
    assert "stage4: data.stage.max_tokens=400: no sample" in res.stderr
    assert "(frames=80, clips=random) can draw is 486 tokens (latent 4x4, patch 2)" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stages_with_tensor_parallel_chain_in_one_process_group(tmp_path):
    """Each stage builds its own TP groups; the previous stage must hand them back first."""
    curriculum = tmp_path / "tp.yaml"
    curriculum.write_text("model: {preset: debug, attention: blockwise}\n"
                          "train: {data: synthetic, steps: 2, log_every: 1, tensorboard: false,\n"
                          "        lr: 1.0e-3, warmup_scheduler_steps: 8}\n"
                          "parallel: {precision: fp32, tensor_parallel: 2}\n"
                          "synthetic: {frames: 4}\n"
                          "stages:\n  - {synthetic: {clip_policy: single_frame}}\n  - {synthetic: {clip_policy: random}}\n")
    cmd = [sys.executable, "-m", "orchestration.cli", "train", "--config", str(curriculum), "--nproc", "2",
           f"--train.out_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for i in (1, 2):
        assert (tmp_path / "run" / f"stage{i}" / "export" / "config.json").is_file()
    init = json.loads((tmp_path / "run" / "stage2" / "init.json").read_text())
    assert init["init_from"].endswith("stage1/export")
    # the reference's warmup counts every process, TP ranks too (world 2), and restarts each stage:
    # LR(n) = lr * min(1, n * 2 / 8) for optimiser steps n = 0, 1
    for i in (1, 2):
        lines = [json.loads(x) for x in (tmp_path / "run" / f"stage{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["lr"] for m in lines] == pytest.approx([0.0, 1e-3 * 2 / 8], rel=1e-6, abs=0)
