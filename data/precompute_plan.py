"""The deterministic plan of a precompute job: which input goes to which shard.

Inputs (a directory, a glob, or a list file of URIs; local or any fsspec URL)
are listed, de-duplicated and sorted, then cut into consecutive runs of
`videos_per_shard`: shard i holds inputs [i*S, (i+1)*S). The same inputs and
settings always give the same plan, so a resubmitted job recomputes it, skips
the shards whose manifest exists and redoes only the rest. `plan.json` at the
output root pins the plan's hash: a later job with other inputs or other
dataset settings is refused instead of mixing two datasets under one root.

Sample keys are stable ids derived from the source URI: a sanitized file stem
(readable) plus a short hash of the full URI (unique), with no dots
(WebDataset splits keys at the first dot). A video cut into several segments
(data/video.py, `segment_bounds`) gives one sample per segment, keyed
`<key>-s0000`, `<key>-s0001`, ...; a plain key never ends that way (it ends in
a hex hash), so `source_key` maps any sample key back to its input.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from data.shard_format import check_key, get_fs, shard_stem
from jobconfig.errors import ConfigError
from jobconfig.precompute import InputsConfig, PrecomputeConfig

PLAN_FILE = "plan.json"


class PlanError(ConfigError):
    """The inputs cannot be planned, or the output root belongs to another plan (bad input)."""


@dataclass(frozen=True)
class ShardPlan:
    index: int
    stem: str  # e.g. train-000003
    items: tuple[tuple[str, str], ...]  # (key, uri) in plan order


def make_key(uri: str) -> str:
    stem = PurePosixPath(uri.rstrip("/")).stem  # dots inside the name become '_' below
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48] or "video"
    return check_key(f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}")


_SEGMENT = re.compile(r"-s\d{4,}$")


def segment_key(key: str, segment: int, num_segments: int) -> str:
    """The sample key of one segment: the input's key itself when the video is a single sample."""
    return key if num_segments == 1 else check_key(f"{key}-s{segment:04d}")


def source_key(sample_key: str) -> str:
    """The input key a sample came from (inverse of `segment_key`)."""
    return _SEGMENT.sub("", sample_key)


def _uri(fs, path: str) -> str:
    # Local files stay plain absolute paths; remote ones keep their protocol.
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def list_inputs(cfg: InputsConfig) -> list[str]:
    """Sorted, de-duplicated input URIs."""
    exts = {e.lower().lstrip(".") for e in cfg.extensions}
    if cfg.list_file:
        fs, path = get_fs(cfg.list_file, cfg.storage_options)
        if not fs.exists(path):
            raise PlanError(f"precompute.inputs.list_file: {cfg.list_file!r} does not exist")
        lines = fs.cat_file(path).decode().splitlines()
        uris = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    else:
        where = cfg.dir or cfg.glob
        fs, path = get_fs(where, cfg.storage_options)
        if cfg.dir:
            if not fs.isdir(path):
                raise PlanError(f"precompute.inputs.dir: {cfg.dir!r} is not a directory")
            found = fs.find(path)
        else:
            found = fs.glob(path)
        uris = [_uri(fs, p) for p in found
                if PurePosixPath(p).suffix.lower().lstrip(".") in exts and not PurePosixPath(p).name.startswith(".")]
    return sorted(set(uris))


def build_plan(uris: list[str], shard_name: str, videos_per_shard: int) -> list[ShardPlan]:
    keyed = [(make_key(u), u) for u in uris]
    seen: dict[str, str] = {}
    for key, uri in keyed:
        if key in seen:
            raise PlanError(f"inputs {seen[key]!r} and {uri!r} map to the same key {key!r}")
        seen[key] = uri
    return [ShardPlan(i, shard_stem(shard_name, i), tuple(keyed[s:s + videos_per_shard]))
            for i, s in enumerate(range(0, len(keyed), videos_per_shard))]


def config_hash(cfg: PrecomputeConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.dataset_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plan_hash(plan: list[ShardPlan], cfg_hash: str) -> str:
    body = json.dumps([[s.stem, [list(i) for i in s.items]] for s in plan] + [cfg_hash])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def pin_plan(fs, root: str, info: dict) -> None:
    """Write plan.json on first run; refuse a root whose plan.json names another plan."""
    path = f"{root}/{PLAN_FILE}"
    fs.invalidate_cache(root)
    if fs.exists(path):
        old = json.loads(fs.cat_file(path))
        if old.get("plan_hash") != info["plan_hash"]:
            raise PlanError(
                f"{path}: this output root holds plan {old.get('plan_hash')} ({old.get('num_inputs')} inputs, "
                f"config {old.get('config_hash')}), but this job plans {info['plan_hash']} "
                f"({info['num_inputs']} inputs, config {info['config_hash']}): the inputs or the dataset "
                "settings changed; write to a new precompute.output.root")
        return
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, json.dumps(info, sort_keys=True, indent=1).encode())
