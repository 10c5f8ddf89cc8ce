"""Resuming a training run on a dataset that grew: the rule, and the refusal.

A latent dataset only grows (data/precompute_plan.py): a later precompute job
appends shards after the existing ones (shard names keep their order) and
publishes a new index version (data/dataset_index.py). A run's loader state
(data/loader.py) records the index its current epoch uses: the version, its
shard count and fingerprint, its columns file, and the epoch of the last step
served. On resume:

- same dataset: exact resume, as always;
- the checkpoint's shards are an unchanged prefix of today's (`prefix`): the
  **epoch in progress finishes over the shards it started with** (the prefix,
  in the order of that index version), and **the new samples join at the next
  epoch** (epoch e + 1 uses today's index, every bucket from its start). The
  order of every epoch stays a pure function of (seed, epoch, position, index
  version). Logged once: "dataset grew from N to M samples (index version
  a -> b): new samples join at epoch e+1". A checkpoint taken exactly at an
  epoch's end joins them at once;
- anything else (a shard rewritten, removed, renamed): refused, naming the
  first differing shard (read from the checkpoint's own index version, whose
  columns file a publish never removes) and how to proceed.

Why not mix new samples into the epoch in progress: its order (shard
permutation, streams, buckets) is fixed by its dataset; re-deriving it over
more shards would serve some samples twice and others never in that epoch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from data.dataset_index import DatasetMeta
from jobconfig.errors import ConfigError

log = logging.getLogger("data.loader")


@dataclass(frozen=True)
class Growth:
    """A resumed epoch runs over the old shards; from `epoch` on, `meta` (today's index) is used."""
    epoch: int
    meta: DatasetMeta
    version: int
    columns: dict | None


def _old_shard_count(full: DatasetMeta, state: dict) -> int | None:
    k = state.get("num_shards")
    if isinstance(k, int):
        return k
    # a state of before shard counts were recorded: the prefix holding its number of samples
    n = state.get("num_samples")
    hit = np.flatnonzero(np.cumsum(full.sizes) == n) if isinstance(n, int) else []
    return int(hit[0]) + 1 if len(hit) else None


def grown_prefix(full: DatasetMeta, state: dict, fs, root: str, where: str) -> DatasetMeta:
    """The checkpoint's dataset as the first shards of today's (`full`), or ConfigError naming the
    first shard that differs and what to do."""
    k = _old_shard_count(full, state)
    if k is not None and 0 < k <= len(full.names):
        old = full.prefix(k)
        if old.fingerprint == state.get("dataset"):
            return old
    first = _first_difference(full, state, fs, root)
    raise ConfigError(
        f"loader state: the checkpoint's dataset (index version {state.get('index_version', '?')}, "
        f"{state.get('num_shards', '?')} shards, {state.get('num_samples')} samples, fingerprint "
        f"{state.get('dataset')}) is not an unchanged prefix of {where} (version {full.version}, "
        f"{len(full.names)} shards, {full.num_samples} samples): {first}. A dataset may only grow (new shards "
        "after the old ones) for a run to resume on it. Resume on the checkpoint's data (restore that shard), "
        "or start a new run from this checkpoint's weights (train.init_from: its data order starts afresh)")


def _first_difference(full: DatasetMeta, state: dict, fs, root: str) -> str:
    ref = state.get("columns")
    if not isinstance(ref, dict):
        return "the checkpoint does not name its index version's columns file, so the shard cannot be named"
    try:
        old = DatasetMeta.load(fs, root, index={"format_version": 2, "version": state.get("index_version", 0),
                                                "columns": ref})
    except (ConfigError, ValueError, OSError) as e:
        return f"its index version's columns file {ref.get('path')} cannot be read ({e}), so the shard cannot be named"
    for i, (name, sha) in enumerate(zip(old.names, old.sha256)):
        if i >= len(full.names):
            return f"shard {name} (number {i}) was removed"
        if full.names[i] != name:
            return f"shard {name} (number {i}) was removed or renamed: today's shard {i} is {full.names[i]}"
        if full.sha256[i] != sha or full.sizes[i] != old.sizes[i]:
            return (f"shard {name} was rewritten (sha256 {sha[:12]}.. with {old.sizes[i]} samples in the "
                    f"checkpoint's index, {full.sha256[i][:12]}.. with {full.sizes[i]} now)")
    return "no shard differs in name or sha256, but the samples' order or sizes do"


def growth_epoch(state: dict, next_epoch: int) -> int:
    """The first epoch that uses the grown dataset: the one after the epoch of the last step served
    (`next_epoch`, the epoch of the next step, for a state that does not record it)."""
    e = state.get("epoch")
    return e + 1 if isinstance(e, int) else next_epoch


def log_growth(old: DatasetMeta, full: DatasetMeta, old_version, epoch: int) -> None:
    log.warning("dataset grew from %d to %d samples (index version %s -> %s): new samples join at epoch %d",
                old.num_samples, full.num_samples, old_version, full.version, epoch)
