"""Config of the streaming latent loader and of the per-stage sample construction.

`DataConfig` is the `data:` section of the job tree (jobconfig/job.py).
It has two parts: where the latent dataset is and how the loader walks it
(seed, shuffle, streams, batch, workers, packing, corrupt-shard policy), and
`StageSamplingConfig`, which turns one stored video into one training sample
for a curriculum stage (METHOD.md, "The four curriculum stages"):

    stage 1: frames 16, interval fixed 4,        clips single_frame
    stage 2: frames 48, interval fixed 4,        clips random
    stage 3: frames 48, interval random [4, 12], clips random
    stage 4: frames 80, interval random [4, 12], clips random, 1.28M tokens

Samples are batched by latent shape (data/buckets.py): every batch holds one
shape bucket "HxW", whose per-rank batch size is bucket_batch_size["HxW"],
else batch_tokens // the most tokens one of its samples can take, else
batch_size; pack_tokens then packs a batch's samples into rows.

The fields that define the order of the data (seed, shuffle_buffer,
num_streams, epoch_tail, the dataset itself) are stored in the loader state and
checked on resume; batch sizes, workers and world size may change freely.

Datasets: `root` names one; `sources: [{root, weight, storage_options?,
name?}, ...]` blends several (data/blend.py: each global step is served by one
source, chosen by a fixed schedule that keeps each source's share of the steps
at its normalised weight). The two are exclusive: a config that gives both is
refused (a `root` next to `sources` is a dataset the user meant to list, or
one left over from a curriculum's shared sections or a launcher's override;
guessing either way trains on other data than asked for); `root: X` alone
is the blend `sources: [{root: X, weight: 1}]`, batch for batch. Every other
key here applies to every source. A curriculum whose shared sections set
`data.root` gives its blending stages `data.root: null`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from jobconfig.errors import ConfigError
from jobconfig.secrets import check_no_credentials


@dataclass
class StageSamplingConfig:
    frames: int = 16                                   # F frames per sample
    interval: Literal["fixed", "random"] = "fixed"
    interval_value: int = 4                            # the fixed interval
    interval_min: int = 4                              # random: d ~ U{lo .. min(hi, (T-1)//(F-1))}
    interval_max: int = 12
    clips: Literal["single_frame", "random"] = "single_frame"  # random: K ~ U{2..F}, random cut points
    max_tokens: int = 1_280_000                        # per sample (data.batch.sequence_length)
    patch_size: int = 2                                # latent patch size used to count tokens

    def validate(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"frames: got {self.frames}, expected a positive integer")
        if self.clips == "random" and self.frames < 2:
            raise ConfigError(f"frames: got {self.frames}, clips=random needs at least 2 frames (K ~ U{{2..F}})")
        if self.interval_value < 1:
            raise ConfigError(f"interval_value: got {self.interval_value}, expected a positive integer")
        if self.interval_min < 1:
            raise ConfigError(f"interval_min: got {self.interval_min}, expected a positive integer")
        if self.interval_max < self.interval_min:
            raise ConfigError(f"interval_max: got {self.interval_max}, expected >= interval_min={self.interval_min}")
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens: got {self.max_tokens}, expected a positive integer")
        if self.patch_size <= 0:
            raise ConfigError(f"patch_size: got {self.patch_size}, expected a positive integer")

    def min_video_frames(self) -> int:
        """Shortest video (stored frames) this stage can use."""
        d = self.interval_value if self.interval == "fixed" else self.interval_min
        return (self.frames - 1) * d + 1


DEFAULT_ROOT = "runs/latents"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class SourceConfig:
    """One dataset of a blend (`data.sources`)."""
    root: str = ""                           # latent dataset root: /path, file://..., s3://bucket/prefix
    weight: float = 1.0                      # share of the steps, relative to the other sources' weights
    storage_options: dict[str, Any] | None = None  # fsspec options of this root; null: data.storage_options
    name: str = ""                           # in metrics and skip reports; '': the root's last path component

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("root: empty, expected a dataset root (/path, file://..., s3://bucket/prefix)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"weight: got {self.weight:g}, expected a positive number")
        if self.storage_options is not None:
            check_no_credentials(self.storage_options, "storage_options")
        if self.name and not _NAME.fullmatch(self.name):
            raise ConfigError(f"name: got {self.name!r}, expected letters, digits, '_', '.' or '-'")

    @property
    def label(self) -> str:
        """The name metrics and skip reports use: `name`, else the root's last path component."""
        return self.name or root_key(self.root).rsplit("/", 1)[-1] or self.root


def root_key(root: str) -> str:
    """A root in one spelling, to find a dataset listed twice: local paths absolute, no trailing '/'."""
    if "://" in root and not root.startswith("file://"):
        return root.rstrip("/")
    return os.path.normpath(os.path.abspath(root.removeprefix("file://")))


@dataclass
class DataConfig:
    # latent dataset root: /path, file://..., s3://bucket/prefix (runs/latents when neither it nor
    # data.sources is given; null when data.sources is)
    root: str | None = None
    # several datasets blended by weight (data/blend.py), instead of root (never with it): each a root, its
    # weight (relative share of the steps), storage_options (null: data.storage_options) and name (for metrics)
    sources: list[SourceConfig] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec (e.g. endpoint); never keys
    seed: int = 0
    shuffle_buffer: int = 256                # bounded shuffle window per stream, in samples (0: no shuffle)
    num_streams: int = 0                     # shard streams the global order interleaves; 0: auto (see order.py)
    batch_size: int = 1                      # samples per rank per step (of every shape bucket not set below)
    bucket_batch_size: dict[str, int] = field(default_factory=dict)  # per latent shape "HxW": samples per rank
    batch_tokens: int = 0                    # > 0: a bucket's batch = this // the most tokens one sample takes
    num_workers: int = 0                     # DataLoader worker processes per rank
    prefetch_shards: int = 2                 # shards fetched ahead per reader (threads; hides s3 latency)
    pack_tokens: int = 0                     # > 0: pack several samples per row up to this many tokens
    corrupt_shards: Literal["skip", "fail"] = "fail"
    verify_sha256: bool = True               # hash every shard against index.json before using it
    epoch_tail: Literal["roll", "drop"] = "roll"  # see loader.py: how the last partial global step is filled
    epochs: int = 0                          # stop after this many epochs (0: endless; trainer counts steps)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # latents handed to the trainer
    stage: StageSamplingConfig = field(default_factory=StageSamplingConfig)

    def __post_init__(self):
        if self.root is None and not self.sources:  # given neither: the default dataset
            self.root = DEFAULT_ROOT

    def validate(self) -> None:
        if self.sources and self.root is not None:
            raise ConfigError(f"root: {self.root!r} given together with data.sources; give one of them "
                              f"(a single root is data.sources: [{{root: {self.root}}}]; a curriculum that "
                              "shares data.root gives a blending stage data.root: null)")
        if self.root is not None and not self.root:
            raise ConfigError("root: empty, expected a dataset root (/path, file://..., s3://bucket/prefix)")
        seen: dict[str, int] = {}
        names: dict[str, int] = {}
        for i, src in enumerate(self.sources):
            if (j := seen.setdefault(root_key(src.root), i)) != i:
                raise ConfigError(f"sources[{i}].root: {src.root} is also data.sources[{j}].root "
                                  f"({self.sources[j].root}); list each dataset once, with the sum of its weights")
            if (j := names.setdefault(src.label, i)) != i:
                raise ConfigError(f"sources[{i}].name: {src.label!r} is also the name of data.sources[{j}] "
                                  f"({self.sources[j].root}); give each source its own name: key")
        for name in ("shuffle_buffer", "num_streams", "num_workers", "pack_tokens", "epochs", "prefetch_shards",
                     "batch_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a non-negative integer")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: got {self.batch_size}, expected a positive integer")
        for key, size in self.bucket_batch_size.items():
            if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", str(key)) or size <= 0:
                raise ConfigError(f"bucket_batch_size: got {key!r}: {size!r}, expected a latent shape 'HxW' "
                                  "(e.g. '22x40') mapped to a positive batch size")
        if not isinstance(self.storage_options, dict):
            raise ConfigError(f"storage_options: got {type(self.storage_options).__name__}, expected a mapping "
                              "of fsspec options (e.g. {endpoint_url: ...})")
        check_no_credentials(self.storage_options, "storage_options")

    def blend(self) -> list[SourceConfig]:
        """The datasets to read: `sources`, or `root` as the one source of weight 1."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(root=self.root or DEFAULT_ROOT, weight=1.0)]

    def options_of(self, source: SourceConfig) -> dict[str, Any]:
        """The fsspec options of one source: its own, else data.storage_options."""
        return self.storage_options if source.storage_options is None else source.storage_options


@dataclass
class SyntheticDataConfig:
    """Moving-square latents: a fixed tiny dataset whose next frame is predictable."""
    num_videos: int = 8
    frames: int = 8
    latent_height: int = 8
    latent_width: int = 8
    clip_policy: Literal["single_frame", "random"] = "random"

    def validate(self) -> None:
        if self.frames < 2:
            raise ConfigError(f"frames: got {self.frames}, expected at least 2")
        if self.num_videos <= 0:
            raise ConfigError(f"num_videos: got {self.num_videos}, expected a positive integer")
