"""Preflight: cheap checks of everything a command will read or write, before any work starts.

`vgpt train` runs `check_train` before any process group, model or DeepSpeed
set-up; `vgpt precompute` and `vgpt predict` run their own. Each problem is a
`ConfigError` naming the config key (or flag) and the file, so the command
line prints one line and exits 2 (orchestration/cli) instead of failing with a
traceback after minutes of set-up, or, worse, training on nothing.

No check touches the network: for s3:// paths only the presence of
credentials is checked (environment, profile, shared credentials file, or
`anon: true` in the key's storage_options).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.batch import patches_per_frame, sequence_length
from data.shard_format import LATENTS_MEMBER, META_MEMBER, ShardFormatError, get_fs, iter_tar, read_index
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from pretrain.checkpoint.export import CONFIG_NAME, export_path, read_export_metadata
from pretrain.checkpoint.storage import is_remote, verify_checkpoint

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
          "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
ASSUME_S3 = "VGPT_ASSUME_S3_CREDENTIALS"  # =1: credentials come from elsewhere (an EC2 instance role)
MAX_SHARDS_SCANNED = 16  # the "is any video long enough" scan reads at most this many shards


def local_path(path: str) -> Path:
    return Path(str(path).removeprefix("file://"))


# ---------------------------------------------------------------- credentials
def s3_credentials_available(storage_options: dict | None) -> bool:
    so = storage_options or {}
    if so.get("anon") is True or (so.get("key") and so.get("secret")) or so.get("profile"):
        return True
    env = os.environ
    if env.get(ASSUME_S3) == "1":
        return True
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or \
            env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        return True
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path.home() / ".aws" / "credentials")
    return Path(shared).is_file()


def s3_paths(tree: Any, prefix: str = "") -> Iterator[tuple[str, str, dict]]:
    """(config key, s3 URL, the storage_options nearest to it) for every s3:// string in a config tree."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    yield from _walk(tree, prefix, {})


def _walk(node: Any, key: str, options: dict) -> Iterator[tuple[str, str, dict]]:
    if isinstance(node, dict):
        so = node.get("storage_options")
        options = so if isinstance(so, dict) else options
        for k, v in node.items():
            if k != "storage_options":
                yield from _walk(v, f"{key}.{k}" if key else str(k), options)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{key}[{i}]", options)
    elif isinstance(node, str) and node.startswith(("s3://", "s3a://")):
        yield key, node, options


def check_s3_credentials(tree: Any, prefix: str = "") -> None:
    for key, url, options in s3_paths(tree, prefix):
        if not s3_credentials_available(options):
            raise ConfigError(
                f"{key}: {url} is on S3 but no AWS credentials were found (looked for AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, "
                f"AWS_WEB_IDENTITY_TOKEN_FILE; or set anon: true in its storage_options; "
                f"{ASSUME_S3}=1 for an instance role)")


# ---------------------------------------------------------------- paths
def check_writable_dir(path: str, key: str) -> None:
    """`path` is (or can be made) a directory we can write: not a file, nearest existing parent writable."""
    if is_remote(path):
        return
    p = local_path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {path} is an existing file, expected a directory")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} is not writable (no write permission on {probe})")


def check_export_file(path: str, key: str) -> dict:
    """An export (the directory a stage or `vgpt ckpt export` writes, or an older single .safetensors file);
    returns its metadata."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / CONFIG_NAME).exists():
        raise ConfigError(f"{key}: {path} is a run's out_dir, expected an export: its export is {export_path(p)} "
                          "(for a checkpoint run `vgpt ckpt export` first)")
    try:
        return read_export_metadata(p)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_resume(resume: str) -> None:
    if resume in ("auto", "none", "fresh") or is_remote(resume):  # the modes: pretrain/training/trainer.py
        return
    p = Path(resume)
    if not p.exists():
        raise ConfigError(f"--resume: {resume} does not exist (expected auto, none, fresh or a checkpoint directory)")
    if not p.is_dir():
        raise ConfigError(f"--resume: {resume} is a file, expected a checkpoint directory (e.g. <out_dir>/checkpoints/"
                          "step_000100)")
    try:
        problems = verify_checkpoint(p, full=False)
    except Exception as e:  # noqa: BLE001 - anything unreadable is not a checkpoint
        problems = [str(e)]
    if problems:
        raise ConfigError(f"--resume: {resume} is not a complete checkpoint: {'; '.join(map(str, problems))[:300]}")


# ---------------------------------------------------------------- dataset
def read_dataset_index(root: str, storage_options: dict, key: str = "data.root") -> dict:
    if not is_remote(root):
        p = local_path(root)
        if not p.exists():
            raise ConfigError(f"{key}: {root} does not exist (expected a latent dataset written by `vgpt precompute`)")
        if not p.is_dir():
            raise ConfigError(f"{key}: {root} is a file, expected a latent dataset directory")
    try:
        index = read_index(*get_fs(root, storage_options))
    except ShardFormatError as e:
        raise ConfigError(f"{key}: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {root}/index.json cannot be read: {e}") from None
    if not isinstance(index.get("shards"), list):
        raise ConfigError(f"{key}: {root}/index.json has no list of shards (corrupt index)")
    return index


def _frames_of(members: dict[str, bytes]) -> int | None:
    meta = members.get(META_MEMBER)
    if meta is not None:
        try:
            n = json.loads(meta).get("frames")
            if isinstance(n, int):
                return n
        except (ValueError, AttributeError):
            pass
    data = members.get(LATENTS_MEMBER)
    if data is not None and len(data) >= 8:  # safetensors: u64 header size, JSON header with shapes
        try:
            (size,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + size])
            return int(header["latents"]["shape"][0])
        except (ValueError, KeyError, IndexError, TypeError):
            return None
    return None


def check_sampleable(name: str, cfg: JobConfig, index: dict) -> None:
    """Some video of the dataset has enough frames for data.stage.frames at the smallest interval."""
    st, root = cfg.data.stage, cfg.data.root
    need = st.min_video_frames()
    shards = [s for s in index["shards"] if isinstance(s, dict)]
    if not shards or not index.get("num_samples"):
        raise ConfigError(f"{name}: data.root: {root}/index.json lists no samples (has the precompute job finished?)")
    longest_possible = max(int(s.get("num_frames", 0)) for s in shards)
    where = (f"data.stage.frames={st.frames} at interval >= "
             f"{st.interval_value if st.interval == 'fixed' else st.interval_min} needs videos of >= {need} frames")
    if longest_possible < need:
        raise ConfigError(f"{name}: {where}, but no shard of {root} holds that many frames in all "
                          f"(at most {longest_possible}); every sample would be skipped")
    fs, froot = get_fs(root, cfg.data.storage_options)
    longest = 0
    for s in [s for s in shards if int(s.get("num_frames", 0)) >= need][:MAX_SHARDS_SCANNED]:
        path = f"{froot}/shards/{s['name']}.tar"
        try:
            with fs.open(path, "rb") as f:
                for _, members in iter_tar(io.BufferedReader(f) if not hasattr(f, "peek") else f, where=path):
                    n = _frames_of(members)
                    if n is None or n >= need:
                        return  # long enough (or unknown: the loader decides)
                    longest = max(longest, n)
        except (ShardFormatError, OSError):
            return  # the loader reports corrupt shards by data.corrupt_shards
    if len(shards) <= MAX_SHARDS_SCANNED:
        raise ConfigError(f"{name}: {where}, but the longest video in {root} has {longest} frames; every sample "
                          "would be skipped (lower data.stage.frames or the interval)")


def check_token_limits(name: str, cfg: JobConfig, index: dict | None) -> None:
    """The smallest sequence F frames can make is one clip: F * (patches + 2) tokens; it must fit
    data.stage.max_tokens and model.max_tokens."""
    st = cfg.data.stage
    if st.max_tokens > cfg.model.max_tokens:
        raise ConfigError(f"{name}: data.stage.max_tokens={st.max_tokens} exceeds model.max_tokens="
                          f"{cfg.model.max_tokens}; the loader would hand the model sequences it refuses")
    shape = (index or {}).get("latent_shape")
    if not shape or len(shape) < 3:
        return
    patches = patches_per_frame((shape[1], shape[2]), cfg.model.patch_size)
    need = sequence_length([[st.frames]], patches)
    limit = min(st.max_tokens, cfg.model.max_tokens)
    if need > limit:
        raise ConfigError(f"{name}: data.stage.frames={st.frames} needs at least {need} tokens per sample at "
                          f"latent {shape[1]}x{shape[2]} ({patches} patches per frame), above the token "
                          f"limit {limit} (data.stage.max_tokens / model.max_tokens)")


# ---------------------------------------------------------------- commands
def check_train(plan: list[tuple[str, JobConfig]], only_stage: int | None = None, resume: str = "auto") -> None:
    """Everything `vgpt train` will read or write, for every stage it will run, before any set-up."""
    check_resume(resume)
    chained = len(plan) > 1
    base_out = plan[0][1].train.out_dir
    indexes: dict[tuple[str, str], dict] = {}
    for i, (name, cfg) in enumerate(plan, start=1):
        if only_stage is not None and i != only_stage:
            continue
        check_s3_credentials(cfg.data, "data")
        check_s3_credentials(cfg.train, "train")
        out_dir = str(Path(base_out) / name) if chained else cfg.train.out_dir
        check_writable_dir(out_dir, "train.out_dir")
        if cfg.train.init_from:
            check_export_file(cfg.train.init_from, "train.init_from")
        elif chained and only_stage is not None and i > 1:
            check_export_file(str(export_path(Path(base_out) / f"stage{i - 1}")),
                              f"train.init_from (stage{i - 1}'s export)")
        if cfg.train.data != "latents":
            continue
        ckey = (cfg.data.root, json.dumps(cfg.data.storage_options, sort_keys=True, default=str))
        if ckey not in indexes:
            indexes[ckey] = read_dataset_index(cfg.data.root, cfg.data.storage_options)
        check_token_limits(name, cfg, indexes[ckey])
        check_sampleable(name, cfg, indexes[ckey])


def check_precompute(cfg) -> None:
    """`precompute:` inputs readable, output root writable, VAE present, credentials for s3://."""
    check_s3_credentials(cfg, "precompute")
    inp = cfg.inputs
    if inp.dir and not is_remote(inp.dir):
        p = local_path(inp.dir)
        if not p.is_dir():
            raise ConfigError(f"precompute.inputs.dir: {inp.dir} " +
                              ("is a file, expected a directory of videos" if p.exists() else "does not exist"))
    if inp.list_file and not is_remote(inp.list_file):
        p = local_path(inp.list_file)
        if not p.is_file():
            raise ConfigError(f"precompute.inputs.list_file: {inp.list_file} " +
                              ("is a directory, expected a file of URIs" if p.exists() else "does not exist"))
        if not os.access(p, os.R_OK):
            raise ConfigError(f"precompute.inputs.list_file: {inp.list_file} is not readable")
    check_writable_dir(cfg.output.root, "precompute.output.root")
    if cfg.vae.path != "tiny" and not is_remote(cfg.vae.path) and not Path(cfg.vae.path).is_dir():
        raise ConfigError(f"precompute.vae.path: {cfg.vae.path} does not exist (expected a diffusers "
                          "AutoencoderKL directory or 'tiny')")


def check_predict(checkpoint: str, videos: list[str], out: str) -> dict:
    meta = check_export_file(checkpoint, "--checkpoint")
    for v in videos:
        if is_remote(v):
            continue
        p = local_path(v)
        if not p.is_file():
            raise ConfigError(f"--video: {v} " + ("is a directory, expected a video file" if p.exists()
                                                   else "does not exist"))
    check_writable_dir(out, "--out")
    return meta
