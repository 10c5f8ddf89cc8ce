"""Exports as `from_pretrained` directories: sharded round trip, diffusers loading in a fresh
process, the older single file still loading, and clear errors for broken directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig
from pretrain.checkpoint.export import (
    load_export,
    load_exported_model,
    parse_shard_size,
    read_export_metadata,
    read_export_tensors,
    save_export,
    weights_fingerprint,
)
from pretrain.model.videogpt import build_model

REPO = Path(__file__).resolve().parents[1]
# a fresh interpreter that imports only the model class and diffusers: what a user of the export runs
FRESH_LOAD = """
import inspect, json, sys
from pretrain.model.pretrained import VideoGPTTransformer
from safetensors.torch import save_file
m = VideoGPTTransformer.from_pretrained(sys.argv[1])
save_file({**m.state_dict(), "buffer/pos_table": m.pos_table.contiguous()}, sys.argv[2])
ours = sorted(k for k in sys.modules if k.startswith(("pretrain.checkpoint", "pretrain.training", "orchestration")))
params = list(inspect.signature(VideoGPTTransformer.__init__).parameters)[1:]
print(json.dumps({"class": type(m).__name__, "provenance": m.config["_videogpt"], "ours": ours,
                  "init_params": params, "training": m.training, "dtype": str(m.dtype)}))
"""


def load_in_fresh_process(export: Path, out: Path) -> dict:
    """`VideoGPTTransformer.from_pretrained(export)` in a new process; its weights land in `out`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(export), str(out)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def trained_model(cfg: ModelConfig) -> torch.nn.Module:
    model = build_model(cfg, seed=5)
    with torch.no_grad():  # no zero or one tensors left: a weight loaded into the wrong place shows
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_two_shard_export_loads_with_from_pretrained_bitwise(tmp_path):
    cfg = ModelConfig()
    model = trained_model(cfg)
    sd = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    out = save_export(sd, tmp_path / "export", cfg, max_shard_size=total * 3 // 4,
                      extra={"stage": "stage2", "step": 7, "init_from": "runs/x/stage1/export",
                             "data": {"root": "s3://b/latents", "storage_options": {"secret": "hunter2"}}})
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
                     "diffusion_pytorch_model-00002-of-00002.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json"]
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd) and len(set(index["weight_map"].values())) == 2
    assert "hunter2" not in (out / "config.json").read_text()  # provenance is redacted
    meta = read_export_metadata(out)
    assert meta["model_config"] == asdict(cfg) and meta["stage"] == "stage2" and meta["step"] == 7

    back = read_export_tensors(out)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    plain = build_model(cfg)
    load_export(plain, out)
    assert weights_fingerprint(plain.state_dict()) == weights_fingerprint(sd)

    got = load_in_fresh_process(out, tmp_path / "loaded.safetensors")
    assert got["class"] == "VideoGPTTransformer" and not got["training"] and got["dtype"] == "torch.float32"
    assert got["provenance"]["stage"] == "stage2" and got["provenance"]["format"] == "videogpt-export-2"
    assert got["ours"] == []  # neither our export code nor the trainer was needed
    assert got["init_params"] == [f.name for f in fields(ModelConfig)]  # the class keeps up with ModelConfig
    loaded = load_file(str(tmp_path / "loaded.safetensors"))
    assert torch.equal(loaded.pop("buffer/pos_table"), model.pos_table)  # recomputed, as no file holds it
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_directory_and_older_single_file_load_the_same_model(tmp_path):
    cfg = ModelConfig()
    sd = trained_model(cfg).state_dict()
    folder = save_export(sd, tmp_path / "export", cfg, dtype=torch.bfloat16, extra={"stage": "s"})
    single = save_export(sd, tmp_path / "model.safetensors", cfg, dtype=torch.bfloat16, extra={"stage": "s"})
    assert single.is_file() and sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]  # below the shard size: one file, no index
    assert read_export_tensors(folder)["special_tokens"].dtype == torch.bfloat16  # kept as saved
    assert read_export_metadata(folder)["dtype"] == "bfloat16"
    a, b = load_exported_model(folder), load_exported_model(single)
    assert weights_fingerprint(a.state_dict()) == weights_fingerprint(b.state_dict())
    # a re-export replaces the earlier one in place, shards and all
    save_export(sd, folder, cfg, max_shard_size=10_000)
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob(".export*"))  # no temporary directory left beside it


def test_broken_export_directories_are_named(tmp_path):
    cfg = ModelConfig()
    sd = build_model(cfg).state_dict()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: a directory without config.json \(expected an export"):
        read_export_metadata(tmp_path / "empty")
    out = save_export(sd, tmp_path / "export", cfg, max_shard_size=10_000)
    index = out / "diffusion_pytorch_model.safetensors.index.json"
    shard = sorted(out.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard}: missing, but {index} names it"):
        load_export(build_model(cfg), out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    with pytest.raises(ConfigError, match="mine: exists and is not an export directory"):
        save_export(sd, tmp_path / "mine", cfg)
    assert (tmp_path / "mine" / "notes.txt").is_file()
    (out / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="config.json: not a Video-GPT export"):
        read_export_metadata(out)
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("2MiB") == 2 * 2**20
    with pytest.raises(ConfigError, match="max_shard_size: got '5 gigs', expected"):
        parse_shard_size("5 gigs")
