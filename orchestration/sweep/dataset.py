"""A sweep on a latent dataset: its checks before Ray starts, the planner's cost of a row, and
what each trial trained on.

`check(cfg, job)` reads the dataset's index once, on the driver, before any trial: the root
exists and is a dataset (`preflight.read_dataset_index`), the base config's stage can use its
samples (`preflight.check_dataset`: the loader's own shape buckets), its held-out split has
samples the stage can evaluate (`latent_eval.plan_heldout`, index only: no shard is read), and
no base key overrides the sweep's batch axis. Every refusal is one ConfigError naming the key.
It returns the dataset's identity (root, index version, split and evaluator versions), which
goes into the trial keys: a grown dataset or a new split re-runs old trials instead of mixing
them.

`row_cost(meta, job)`: the tokens and attention pairs of one training row, for the IsoFLOP
planner (orchestration/sweep/plan.py), which cannot replay the loader's order. Exact when every
sample the stage uses has one latent shape and its clips are fixed (`clips: single_frame`, stage
1); otherwise the mean over the shape buckets (weighted by their sizes) and over a fixed draw of
the stage's clip partitions, so a trial lands on its compute level on average, and the result
records the FLOPs it really trained.

`recording_source(out)`: the trainer's data source (data/sources.py `make_source`), recording
the key of every sample each step served; `write_trained_keys` writes them to the trial dir
(`trained_keys.rank<r>.json`, key -> times served) and refuses a trial that trained on a key of
the held-out split: what the sweep's held-out loss means is checked from what the trial saw.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np

from data.batch import patches_per_frame, sequence_length
from data.buckets import build_buckets
from data.dataset_index import DatasetMeta
from data.heldout_split import SPLIT_VERSION, heldout_mask
from data.precompute_plan import source_key
from data.shard_format import get_fs
from data.sources import make_source
from data.stage import clip_sizes
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from orchestration.preflight import check_dataset, check_s3_credentials, read_dataset_index
from pretrain.evaluation.latent_eval import EVAL_VERSION, plan_heldout
from pretrain.training.metrics import allowed_attention_pairs

CLIP_DRAWS = 4096  # clip partitions drawn per shape bucket for the mean cost of a random-clips stage
KEYS_FILE = "trained_keys.rank{rank}.json"


def check(dataset: str, job: JobConfig) -> tuple[DatasetMeta, dict]:
    """(index, identity) of the sweep's dataset; a ConfigError naming the key when it cannot be trained on."""
    d = job.data
    for key in ("pack_tokens", "batch_tokens"):
        if getattr(d, key):
            raise ConfigError(f"data.{key}: got {getattr(d, key)} in the base config or job_overrides; a sweep's "
                              "batch is grid.batch_sizes samples per step: set it to 0")
    if d.bucket_batch_size:
        raise ConfigError("data.bucket_batch_size: set in the base config or job_overrides; a sweep's batch is "
                          "grid.batch_sizes samples per step: remove it")
    check_s3_credentials({"dataset": dataset, "storage_options": d.storage_options})
    meta = read_dataset_index(dataset, d.storage_options, key="dataset")
    check_dataset("dataset", job, meta, dataset)
    try:
        plan_heldout(meta, job, dataset)
    except ConfigError as e:
        raise ConfigError(f"eval.heldout_fraction: {job.eval.heldout_fraction} of {dataset}: {e}") from None
    return meta, {"root": dataset, "version": meta.version, "split": SPLIT_VERSION, "eval": EVAL_VERSION}


def row_cost(meta: DatasetMeta, job: JobConfig) -> tuple[float, float]:
    """(tokens, attention pairs) of one training row of `job` on this dataset (exact or mean: see above)."""
    stage, p = job.data.stage, job.model.patch_size
    buckets = build_buckets(meta, job.data, heldout=job.eval.split_fraction)
    rng = random.Random(0)
    draws = [tuple([1] * stage.frames)] if stage.clips == "single_frame" else \
        [clip_sizes(stage.clips, stage.frames, rng) for _ in range(CLIP_DRAWS)]
    tokens = pairs = 0.0
    total = sum(buckets.sizes)
    for name, size in zip(buckets.names, buckets.sizes):
        if not size:
            continue
        h, _, w = name.partition("x")
        patches = patches_per_frame((int(h), int(w)), p)
        tokens += size / total * float(np.mean([sequence_length([list(c)], patches) for c in draws]))
        pairs += size / total * float(np.mean([allowed_attention_pairs([list(c)], patches) for c in draws]))
    return tokens, pairs


class _Recording:
    """A data source that records the keys of the samples it serves (everything else: the source's)."""

    def __init__(self, source):
        self._source, self.served = source, Counter()

    def next_batch(self):
        batch, rows = self._source.next_batch()
        if batch.clips:  # a step whose samples were all skipped trains on none of them
            self.served.update(k for row in batch.keys for k in row)
        return batch, rows

    def __getattr__(self, name):
        return getattr(self._source, name)


def recording_source(sources: list):
    """A `data_factory` for the Trainer: make_source, recorded; each source made is appended to `sources`."""
    def make(cfg, dp_rank, dp_size):
        sources.append(_Recording(make_source(cfg, dp_rank, dp_size)))
        return sources[-1]
    return make


def write_trained_keys(job: JobConfig, served: Counter, out: Path, rank: int) -> int:
    """Write the keys this rank trained on; raise if one is in the held-out split. Returns the samples served."""
    (out / KEYS_FILE.format(rank=rank)).write_text(json.dumps(dict(sorted(served.items()))))
    root = job.data.root
    meta = DatasetMeta.load(*get_fs(root, job.data.storage_options), where=f"{root}/index.json")
    # served keys are videos' (data/videos.py: a long video's segments serve under its input's key)
    held = {source_key(meta.key(int(i))) for i in np.flatnonzero(heldout_mask(meta, job.eval.split_fraction))}
    if leaked := sorted(held & set(served)):
        raise RuntimeError(f"trial trained on {len(leaked)} sample(s) of the held-out split of {root}: "
                           f"{leaked[:5]}; its held-out loss would not be held out")
    return sum(served.values())


def trained_keys(trial_dir: Path) -> Counter:
    """Every key a finished trial trained on (all its ranks), with the times it was served."""
    out = Counter()
    for f in sorted(Path(trial_dir).glob(KEYS_FILE.format(rank="*"))):
        out.update(json.loads(f.read_text()))
    return out
