"""Preflight: cheap checks of everything a command will read or write, before any work starts.

`vgpt train` runs `check_train` before any process group, model or DeepSpeed
set-up; `vgpt precompute` and `vgpt predict` run their own. Each problem is a
`ConfigError` naming the config key (or flag) and the file, so the command
line prints one line and exits 2 (orchestration/cli) instead of failing with a
traceback after minutes of set-up, or, worse, training on nothing.

No check touches the network but to read a dataset's index.json: for s3://
paths only the presence of credentials is checked (environment, profile,
shared credentials file, or `anon: true` in the key's storage_options). The
dataset checks read no shard: they ask the data layer (data/buckets.py) what
the loader will make of the shapes index.json records per sample.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.buckets import Buckets, build_buckets
from data.dataset_index import DatasetMeta
from data.shard_format import ShardFormatError, get_fs
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from orchestration.planning import check_fits, dataset_latent_size, train_device
from orchestration.stages import already_done, exported_by
from pretrain.checkpoint.export import CONFIG_NAME, export_path, read_export_metadata
from pretrain.checkpoint.storage import is_remote, verify_checkpoint
from pretrain.training.resume_plan import NAMED_MODES, plan_resume

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
          "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
ASSUME_S3 = "VGPT_ASSUME_S3_CREDENTIALS"  # =1: credentials come from elsewhere (an EC2 instance role)


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


def check_resume(resume: str, out_dir: str | None = None) -> None:
    """What `--resume` will do (pretrain/training/resume_plan.py), refused now rather than once the
    process groups are up: a checkpoint directory must be complete; auto, none and fresh are planned
    for `out_dir` (a stage's). Sizes are checked against the manifests here; the Trainer re-hashes."""
    if resume in NAMED_MODES and (out_dir is None or is_remote(out_dir)):
        return
    plan_resume(resume, local_path(out_dir or "."), problems=lambda ckpt: verify_checkpoint(ckpt, full=False))


# ---------------------------------------------------------------- dataset
def read_dataset_index(root: str, storage_options: dict, key: str = "data.root") -> DatasetMeta:
    if not is_remote(root):
        p = local_path(root)
        if not p.exists():
            raise ConfigError(f"{key}: {root} does not exist (expected a latent dataset written by `vgpt precompute`)")
        if not p.is_dir():
            raise ConfigError(f"{key}: {root} is a file, expected a latent dataset directory")
    try:
        return DatasetMeta.load(*get_fs(root, storage_options), where=f"{root}/index.json")
    except (ShardFormatError, ConfigError) as e:  # ConfigError: no samples, a bad shard list
        raise ConfigError(f"{key}: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {root}/index.json cannot be read: {e}") from None


def check_dataset(name: str, cfg: JobConfig, meta: DatasetMeta, root: str | None = None,
                  source: str = "") -> Buckets:
    """The stage can use some sample of the dataset, decided as the loader decides it: its own shape
    buckets (data/buckets.py), built from the shapes index.json records per sample, refuse a stage
    whose videos are all too short, or none of whose samples fits data.stage.max_tokens even at its
    shortest draw, naming the key. An index of before per-sample shapes gives only shard totals: a
    stage longer than every shard's frames in all is refused, the rest is left to the loader.
    `root`: the dataset's (default data.root); `source` names a dataset of data.sources in the error.
    Returns the stage's shape buckets of the dataset."""
    st, root = cfg.data.stage, root or cfg.data.root
    if st.max_tokens > cfg.model.max_tokens:
        raise ConfigError(f"{name}: data.stage.max_tokens={st.max_tokens} exceeds model.max_tokens="
                          f"{cfg.model.max_tokens}; the loader would hand the model sequences it refuses")
    where = f"{root}/index.json"
    try:
        if not meta.has_shapes:
            need = st.min_video_frames()
            longest_possible = max(meta.shard_frames)
            if longest_possible < need:
                d = st.interval_value if st.interval == "fixed" else st.interval_min
                raise ConfigError(f"data.stage.frames={st.frames} at interval >= {d} needs videos of >= {need} "
                                  f"frames, but no shard of {root} holds that many frames in all (at most "
                                  f"{longest_possible}); every sample would be skipped")
        return build_buckets(meta, cfg.data, where=where)
    except (ConfigError, ShardFormatError) as e:  # ShardFormatError: segments that group into no video
        raise ConfigError(f"{name}: {source}: {e}" if source else f"{name}: {e}") from None


# ---------------------------------------------------------------- commands
def check_train(plan: list[tuple[str, JobConfig]], only_stage: int | None = None,
                resume: str = "auto") -> dict[str, tuple[int, int]]:
    """Everything `vgpt train` will read or write, for every stage it will run, before any set-up.
    `plan` is chained (orchestration/stages.py): its out_dir and init_from are the ones each stage runs with.
    Returns the latent shape each latent-data stage's memory plan is for (`check_memory`)."""
    check_resume(resume)
    indexes: dict[tuple[str, str], DatasetMeta] = {}
    latent_sizes = {}
    for i, (name, cfg) in enumerate(plan, start=1):
        if only_stage is not None and i != only_stage:
            continue
        check_s3_credentials(cfg.data, "data")
        check_s3_credentials(cfg.train, "train")
        check_writable_dir(cfg.train.out_dir, "train.out_dir")
        if resume in NAMED_MODES and not already_done(plan, cfg, only_stage, resume):  # done: run_plan skips it
            check_resume(resume, cfg.train.out_dir)
        init = cfg.train.init_from
        producer = exported_by(plan, i, init) if init else None
        # an earlier stage of this same run writes it; with --stage, that stage has run already or it is missing
        if init and (only_stage is not None or producer is None):
            check_export_file(init, f"train.init_from ({producer}'s export)" if producer else "train.init_from")
        if cfg.train.data != "latents":
            continue
        hw = check_stage_data(name, cfg, indexes)
        if hw is not None:
            latent_sizes[name] = hw
    return latent_sizes


def check_stage_data(name: str, cfg: JobConfig, indexes: dict | None = None) -> tuple[int, int] | None:
    """A latent-data stage's datasets (data.root, or each of data.sources): readable, and usable by
    the stage (`check_dataset`); returns the latent shape its memory plan is for (plan.latent_size,
    else the heaviest shape bucket: orchestration/planning.py `dataset_latent_size`). `indexes`
    caches the indexes read, by root and storage options."""
    indexes = {} if indexes is None else indexes
    buckets = []
    for j, src in enumerate(cfg.data.blend()):
        key, source = ("data.root", "") if not cfg.data.sources else \
            (f"data.sources[{j}].root", f"data.sources[{j}] ({src.label})")
        options = cfg.data.options_of(src)
        ckey = (src.root, json.dumps(options, sort_keys=True, default=str))
        if ckey not in indexes:
            indexes[ckey] = read_dataset_index(src.root, options, key)
        buckets.append(check_dataset(name, cfg, indexes[ckey], src.root, source))
    return dataset_latent_size(cfg, buckets)


def check_memory(plan: list[tuple[str, JobConfig]], world_size: int, only_stage: int | None = None,
                 latent_sizes: dict[str, tuple[int, int]] | None = None) -> None:
    """Every stage this run starts fits its device by its memory plan (orchestration/planning.py),
    planned for its dataset's heaviest latent shape (`latent_sizes`, from `check_train`); CPU runs
    plan against no device and pass."""
    stages = [s for i, s in enumerate(plan, start=1) if only_stage is None or i == only_stage]
    check_fits(stages, world_size, train_device, latent_sizes)


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
    check_s3_credentials({"--video": list(videos)})
    for v in videos:
        if is_remote(v):
            continue
        p = local_path(v)
        if not p.is_file():
            raise ConfigError(f"--video: {v} " + ("is a directory, expected a video file" if p.exists()
                                                   else "does not exist"))
    check_writable_dir(out, "--out")
    return meta
