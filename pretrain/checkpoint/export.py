"""Consolidated model exports: one safetensors file with the model config in its header.

What inference and the next curriculum stage load. Weights only, no pickle; a
file made for another model shape is refused with the first differing key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jobconfig.errors import ConfigError
from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from jobconfig.secrets import redact
from pretrain.model.videogpt import build_model


def export_path(out_dir: str | Path) -> Path:
    """Where a run (one stage) writes its final export, and where the next stage and the tools find it."""
    return Path(out_dir) / "export" / "model.safetensors"

# 2: the reference's model (frame-causal clean stream, <img>/</img> rows, raw t); 1 trained another model
EXPORT_FORMAT = "videogpt-export-2"


def save_export(state_dict: dict[str, torch.Tensor], path: str | Path, model_cfg: ModelConfig,
                dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    meta = {"model_config": json.dumps(asdict(model_cfg)), "format": EXPORT_FORMAT,
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=redact(meta))  # a config value never lands in a file
    tmp.replace(path)
    return path


SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "latent_channels", "patch_size")


def read_export_metadata(path: str | Path) -> dict:
    """The export's header, JSON values decoded: model_config, stage, step, data recipe."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (expected an export, e.g. <out_dir>/export/model.safetensors "
                          "or the output of `vgpt ckpt export`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 safetensors raises its own error types for other files
        raise ConfigError(f"{path} is not a safetensors export: {e}") from None
    if "model_config" not in meta:
        raise ConfigError(f"{path}: not a Video-GPT export (no model_config in its header)")
    if meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: export format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}; earlier "
                          "formats hold a model that differs from the authors' Video-GPT (attention rule, "
                          "delimiter tokens, time scale), which this version cannot run: retrain it")
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def read_export_config(path: str | Path) -> dict:
    return read_export_metadata(path)["model_config"]


def check_export_shape(exported: dict, cfg: ModelConfig, path: str | Path) -> None:
    """An export of another model size is refused, naming the first differing key."""
    for key in SHAPE_KEYS:
        if exported.get(key) != getattr(cfg, key):
            raise ConfigError(f"{path}: exported with model.{key}={exported.get(key)}, but this model has "
                              f"model.{key}={getattr(cfg, key)} (an export of another model size)")


def load_export(model: torch.nn.Module, path: str | Path) -> None:
    """Load an export into a plain model of the same shape, strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.init_from: {path} does not exist")
    check_export_shape(read_export_config(path), model.cfg, path)
    own = model.state_dict()
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        missing = sorted(set(own) - set(f.keys()))
        if missing:
            raise ConfigError(f"{path}: lacks {missing[:4]}")
        for k, v in own.items():
            shape = tuple(f.get_slice(k).get_shape())
            if shape != tuple(v.shape):
                raise ConfigError(f"{path}: {k} has shape {shape}, this model expects {tuple(v.shape)}")
            v.copy_(f.get_tensor(k).to(v.dtype))


def load_exported_model(path: str | Path, device: str | torch.device = "cpu",
                        expect: ModelConfig | None = None) -> torch.nn.Module:
    """Build the model an export describes (its header config) and load it; for inference.

    `expect`: the model a config names; an export of another size is refused with the first
    differing key instead of being silently used.
    """

    header = read_export_config(path)
    if expect is not None:
        check_export_shape(header, expect, path)
    cfg = from_dict(ModelConfig, header)
    cfg.phi3_checkpoint = None  # the export holds the trained weights; never re-read the initial ones
    if expect is not None:
        cfg.attention = expect.attention
    model = build_model(cfg, device=device)
    load_export(model, path)
    return model.eval()


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
