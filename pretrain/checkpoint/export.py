"""Model exports: a `from_pretrained` directory (the Hugging Face layout), or the older single file.

What inference, the next curriculum stage and `vgpt convert` load. Weights only,
no pickle; an export made for another model shape is refused with the first
differing key.

The directory (`export_path(out_dir)`, `vgpt ckpt export --out DIR`) is what
diffusers' ModelMixin reads (file names as diffusers.utils.constants), so
`pretrain.model.pretrained.VideoGPTTransformer.from_pretrained(dir)` loads it
with diffusers alone, and the Hub takes it as it is:

    config.json        _class_name, _diffusers_version, the ModelConfig fields, and
                       under PROVENANCE_KEY ours: format, dtype, stage, step, init_from,
                       data recipe (redacted: a config value never lands in a file)
    diffusion_pytorch_model.safetensors                   up to max_shard_size, else
    diffusion_pytorch_model-0000i-of-0000n.safetensors    and the index naming each
    diffusion_pytorch_model.safetensors.index.json        tensor's file (weight_map)

It is written beside its place and renamed into it, so a reader (the next stage,
`vgpt train` skipping a finished stage) never sees half an export. The older
layout, one .safetensors with the config in its header, still loads, and is
still written for a path ending in .safetensors (the portable checkpoint's
weights, `vgpt ckpt export --out F.safetensors`). The writer does not import
diffusers: the trainer exports without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jobconfig.errors import ConfigError
from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from jobconfig.secrets import redact, redact_text
from pretrain.checkpoint import schema
from pretrain.model.videogpt import build_model

# 2: the reference's model (frame-causal clean stream, <img>/</img> rows, raw t); 1 trained another model.
# The model, not the container: a directory and a single file of format 2 hold the same model.
EXPORT_FORMAT = "videogpt-export-2"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_NAME = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"
MODEL_CLASS = "VideoGPTTransformer"  # pretrain/model/pretrained.py
PROVENANCE_KEY = "_videogpt"  # leading '_': diffusers' ConfigMixin keeps it in model.config, out of __init__
DEFAULT_MAX_SHARD_SIZE = "5GB"
# provenance redacted as text only (credential values, not keys): `reference` (orchestration/convert.py) holds the
# authors' files and token ids, whose key names (token_ids) look like credentials to redact's key rule
TEXT_REDACTED = ("reference",)
EXPECTED = ("an export: a directory with config.json and diffusion_pytorch_model*.safetensors, e.g. "
            "<out_dir>/export or the output of `vgpt ckpt export`, or an older single-file export .safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def export_path(out_dir: str | Path) -> Path:
    """Where a run (one stage) writes its final export, and where the next stage and the tools find it."""
    return Path(out_dir) / "export"


def export_exists(path: str | Path) -> bool:
    """A complete export is there (a directory is renamed into place only once written)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() if path.is_dir() else path.is_file()


def parse_shard_size(size: int | str) -> int:
    """max_shard_size in bytes: an int, or digits and a unit as Hugging Face writes them ("5GB", "500MiB")."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(size))
    if isinstance(size, bool) or not m or m.group(2).upper() not in _UNITS or int(m.group(1)) <= 0:
        raise ConfigError(f"max_shard_size: got {size!r}, expected a positive byte count or digits with a unit "
                          "(KB, MB, GB, KiB, MiB, GiB), e.g. '5GB'")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def save_export(state_dict: dict[str, torch.Tensor], path: str | Path, model_cfg: ModelConfig,
                dtype: torch.dtype = torch.float32, extra: dict | None = None,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write an export: a directory, or the older single file when `path` ends in .safetensors."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        return _save_single_file(tensors, path, model_cfg, extra)
    provenance = {"format": EXPORT_FORMAT, "dtype": str(dtype).removeprefix("torch."), **(extra or {})}
    opaque = {k: provenance.pop(k) for k in TEXT_REDACTED if k in provenance}
    config = redact({"_class_name": MODEL_CLASS, "_diffusers_version": _diffusers_version(), **asdict(model_cfg),
                     PROVENANCE_KEY: provenance})  # a config value never lands in a file
    config[PROVENANCE_KEY].update({k: json.loads(redact_text(json.dumps(v))) for k, v in opaque.items()})
    return _save_directory(tensors, path, config, parse_shard_size(max_shard_size))


def _diffusers_version() -> str:
    try:  # the installed version, read without importing diffusers
        return version("diffusers")
    except PackageNotFoundError:
        return "0.31.0"  # the oldest this project supports (pyproject.toml)


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard file, in order; a shard is closed before it would pass max_bytes
    (a single tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, the file then given the mode `open()` gives a new file here (0o666 less the
    umask): `save_file` creates its files 0600, which teammates on a shared filesystem cannot read."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0o077)  # reading the umask means setting it: restored at once
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _save_directory(tensors: dict[str, torch.Tensor], path: Path, config: dict, max_bytes: int) -> Path:
    # replaced: an earlier export (or, in a run's out_dir, the older layout's export/model.safetensors);
    # anything else is someone's directory
    if path.exists() and not (path.is_dir() and all(p.is_file() and p.suffix in (".json", ".safetensors")
                                                    for p in path.iterdir())):
        raise ConfigError(f"{path}: exists and is not an export directory (it holds more than config.json and "
                          "safetensors files); give a new directory, or an earlier export to replace")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed half-way
    tmp.mkdir(parents=True)
    shards = plan_shards(tensors, max_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [SHARD_NAME.format(i, len(shards)) for i in
                                                      range(1, len(shards) + 1)]
    for file, shard in zip(names, shards, strict=True):
        write_safetensors({k: tensors[k] for k in shard}, tmp / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: file for file, shard in zip(names, shards) for k in shard}}
        (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def _save_single_file(tensors: dict[str, torch.Tensor], path: Path, model_cfg: ModelConfig,
                      extra: dict | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model_config": json.dumps(asdict(model_cfg)), "format": EXPORT_FORMAT,
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tensors, tmp, metadata=redact(meta))  # a config value never lands in a file
    tmp.replace(path)
    return path


SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "latent_channels", "patch_size")


def read_export_metadata(path: str | Path) -> dict:
    """The export's config and provenance, JSON values decoded: model_config, format, stage, step, data recipe."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist (expected {EXPECTED})")
    meta = _read_directory_metadata(path) if path.is_dir() else _read_file_metadata(path)
    if meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: export format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}; earlier "
                          "formats hold a model that differs from the authors' Video-GPT (attention rule, "
                          "delimiter tokens, time scale), which this version cannot run: retrain it")
    _model_config(meta.get("model_config"), path / CONFIG_NAME if path.is_dir() else path)
    return meta


def _read_directory_metadata(path: Path) -> dict:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: a directory without {CONFIG_NAME} (expected {EXPECTED}; for a checkpoint "
                          "directory run `vgpt ckpt export` first)")
    config = schema.read_json(cfg_file)  # not JSON, too large or too deep: refused
    if not isinstance(config, dict) or not isinstance(config.get(PROVENANCE_KEY), dict):
        raise ConfigError(f"{cfg_file}: not a Video-GPT export (no {PROVENANCE_KEY!r} object with its format "
                          f"and provenance; expected {EXPECTED})")
    model_config = {f.name: config[f.name] for f in fields(ModelConfig) if f.name in config}
    return {**config[PROVENANCE_KEY], "model_config": model_config}


def _model_config(model_config, where: Path) -> dict:
    """The export's model config, refused (naming the file) unless it is one ModelConfig accepts."""
    if not isinstance(model_config, dict):
        raise schema.refuse(where, "model_config", "a JSON object of model.* keys", model_config)
    try:
        from_dict(ModelConfig, dict(model_config), "model")
    except ConfigError as e:
        raise schema.RefusedFile(f"{where}: {e}") from None
    return model_config


def _read_file_metadata(path: Path) -> dict:
    meta = _open_safetensors(path, "{file} is not a safetensors export: {detail} (expected " + EXPECTED + ")"
                             ).metadata  # the header only, parsed and checked by us
    if "model_config" not in meta:
        raise ConfigError(f"{path}: not a Video-GPT export (no model_config in its header; expected {EXPECTED})")
    out = {}
    for k, v in meta.items():
        try:
            out[k] = schema.parse_json(v, f"{path} (header __metadata__.{k})")
        except ConfigError:
            out[k] = v
    return out


def _open_safetensors(file: Path, refusal: str = "{file}: not a readable safetensors file ({detail})"
                      ) -> schema.Header:
    """A weights file's header, checked (schema.safetensors_header) before safetensors opens the file;
    refused with `refusal` (the file, and the field and what was expected as its detail)."""
    try:
        return schema.safetensors_header(file)
    except (ConfigError, OSError) as e:
        detail = str(e).removeprefix(f"{file}: ") if isinstance(e, ConfigError) else e.strerror
        raise schema.RefusedFile(refusal.format(file=file, detail=detail)) from None


def read_export_config(path: str | Path) -> dict:
    return read_export_metadata(path)["model_config"]


class ExportTensors:
    """An export's tensors by name, across its shard files (or in the one older file); a context manager.

    Headers only are read on opening; `get` reads one tensor (safetensors maps the files).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._file: dict[str, Path] = {}
        try:
            for file, expected in _weight_files(self.path).items():
                _open_safetensors(file)  # length, offsets, dtypes and shapes of the header first
                try:
                    handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
                except Exception as e:  # noqa: BLE001 safetensors raises its own error types
                    raise ConfigError(f"{file}: not a readable safetensors file ({e})") from None
                names = set(handle.keys())
                if expected is not None and not expected <= names:
                    raise ConfigError(f"{file}: lacks {sorted(expected - names)[:4]}, which "
                                      f"{self.path / WEIGHTS_INDEX_NAME} places there")
                self._where.update(dict.fromkeys(names if expected is None else expected, handle))
                self._file.update(dict.fromkeys(names if expected is None else expected, file))
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> ExportTensors:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def file(self, name: str) -> Path:
        """The weights file that holds tensor `name` (how messages name it)."""
        return self._file[name]


def _weight_files(path: Path) -> dict[Path, set[str] | None]:
    """The export's weight files, each with the names its index places there (None: all it holds)."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist (expected {EXPECTED})")
    if not path.is_dir():
        return {path: None}
    index_file = path / WEIGHTS_INDEX_NAME
    if index_file.is_file():
        index = schema.read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConfigError(f"{index_file}: expected JSON with a 'weight_map' object of tensor name -> "
                              "shard file")
        files: dict[Path, set[str] | None] = {}
        for name, file in weight_map.items():
            if Path(file).name != file:
                raise ConfigError(f"{index_file}: shard {file!r} is not a file name in {path}")
            files.setdefault(path / file, set()).add(name)
        for file in files:
            if not file.is_file():
                raise ConfigError(f"{file}: missing, but {index_file} names it (an incomplete copy?)")
        return files
    if not (path / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{path}: holds neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (expected {EXPECTED})")
    return {path / WEIGHTS_NAME: None}


def read_export_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export (either layout), as stored."""
    with ExportTensors(path) as f:
        return {k: f.get(k) for k in f.keys()}


def check_export_shape(exported: dict, cfg: ModelConfig, path: str | Path) -> None:
    """An export of another model size is refused, naming the first differing key."""
    for key in SHAPE_KEYS:
        if exported.get(key) != getattr(cfg, key):
            raise ConfigError(f"{path}: exported with model.{key}={exported.get(key)}, but this model has "
                              f"model.{key}={getattr(cfg, key)} (an export of another model size)")


def load_export(model: torch.nn.Module, path: str | Path) -> None:
    """Load an export (either layout) into a plain model of the same shape, strictly."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"train.init_from: {path} does not exist (expected {EXPECTED})")
    check_export_shape(read_export_config(path), model.cfg, path)
    own = model.state_dict()
    with ExportTensors(path) as f, torch.no_grad():
        missing = sorted(set(own) - set(f.keys()))
        if missing:
            raise ConfigError(f"{path}: lacks {missing[:4]}")
        for k, v in own.items():
            shape = f.shape(k)
            if shape != tuple(v.shape):
                raise schema.RefusedFile(f"{f.file(k)}: tensor {k!r} has shape {shape}, this model expects "
                                         f"{tuple(v.shape)}")
            v.copy_(f.get(k).to(v.dtype))


def load_exported_model(path: str | Path, device: str | torch.device = "cpu",
                        expect: ModelConfig | None = None) -> torch.nn.Module:
    """Build the model an export describes (its config) and load it; for inference.

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
