"""Config of the latent-precompute farm (`vgpt precompute`): the `precompute:` section.

Plain dataclasses with `validate()` raising `ConfigError("key: why")`, nested
into `JobConfig` (jobconfig/job.py). Split by concern: what to read
(inputs), what to write (output), how frames are taken (video), the VAE, what
a frame's latents hold (`latents`: the posterior's mean and std, or one draw),
and the Ray resources. Only `inputs`, `output.root`, `video`, `vae`, `latents`
and `output.shard_name/videos_per_shard` change the dataset; `ray` and `progress`
only change speed, so they are left out of the config hash (see
`PrecomputeConfig.dataset_dict`). Credentials never appear here: s3fs takes
them from the environment (AWS_* variables, instance roles).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from jobconfig.errors import ConfigError
from jobconfig.secrets import check_no_credentials

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "mov", "avi", "m4v", "ts", "mpg", "mpeg", "flv", "gif")


@dataclass
class InputsConfig:
    """Exactly one of dir / glob / list_file. Each may be local or any fsspec URL."""
    dir: Optional[str] = None  # every file under it whose extension is in `extensions`
    glob: Optional[str] = None  # e.g. s3://bucket/raw/**/*.mp4
    list_file: Optional[str] = None  # one URI per line; blank lines and '#' comments skipped
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    storage_options: dict[str, Any] = field(default_factory=dict)  # e.g. endpoint_url; never keys

    def validate(self) -> None:
        given = [n for n in ("dir", "glob", "list_file") if getattr(self, n)]
        if len(given) != 1:
            raise ConfigError(f"dir/glob/list_file: got {given or 'none'}, expected exactly one of them")
        if not self.extensions:
            raise ConfigError("extensions: got an empty list, expected file extensions such as ['mp4']")
        check_no_credentials(self.storage_options, "storage_options")


@dataclass
class OutputConfig:
    root: str = "runs/precompute/tiny"  # local path, file:// or s3://bucket/prefix
    storage_options: dict[str, Any] = field(default_factory=dict)  # endpoint_url only; keys come from env
    shard_name: str = "train"
    videos_per_shard: int = 64
    latent_dtype: Literal["bf16", "fp16"] = "bf16"

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("root: got an empty string, expected a path or URL")
        if self.videos_per_shard <= 0:
            raise ConfigError(f"videos_per_shard: got {self.videos_per_shard}, expected a positive integer")
        if not self.shard_name or not self.shard_name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"shard_name: got {self.shard_name!r}, expected letters, digits, '_' or '-'")
        check_no_credentials(self.storage_options, "storage_options")


@dataclass
class VideoConfig:
    """Frame sampling and geometry (METHOD.md, Latents) and the rejection rules."""
    max_image_size: int = 320  # long side after resize
    sample_fps: Optional[float] = None  # take frames at this rate (by timestamp) ...
    stride: int = 1  # ... or, when sample_fps is null, every stride-th decoded frame
    max_frames: int = 0  # at most this many sampled frames per sample; 0 = no limit
    # A video with more: `segment` cuts it into several samples (keys <key>-s0000, -s0001, ...) so every
    # frame is used; `truncate` keeps only its first max_frames.
    long_videos: Literal["segment", "truncate"] = "segment"
    segment_overlap: int = 0  # frames shared by consecutive segments (< max_frames)
    min_frames: int = 16  # fewer sampled frames than this: rejected
    min_side: int = 128  # source width or height below this: rejected
    max_aspect: float = 4.0  # source long/short side above this: rejected

    def validate(self) -> None:
        if self.max_image_size < 16:
            raise ConfigError(f"max_image_size: got {self.max_image_size}, expected >= 16")
        if self.sample_fps is not None and self.sample_fps <= 0:
            raise ConfigError(f"sample_fps: got {self.sample_fps}, expected a positive number or null")
        if self.stride <= 0:
            raise ConfigError(f"stride: got {self.stride}, expected a positive integer")
        if self.max_frames < 0 or self.min_frames < 1:
            raise ConfigError(f"min_frames/max_frames: got {self.min_frames}/{self.max_frames}, "
                              "expected min_frames >= 1 and max_frames >= 0")
        if self.max_frames and self.max_frames < self.min_frames:
            raise ConfigError(f"max_frames: got {self.max_frames}, expected 0 or >= min_frames={self.min_frames}")
        if self.max_aspect < 1.0:
            raise ConfigError(f"max_aspect: got {self.max_aspect}, expected >= 1.0")
        if self.segment_overlap < 0 or (self.segment_overlap and self.segment_overlap >= self.max_frames):
            raise ConfigError(f"segment_overlap: got {self.segment_overlap}, expected 0 <= segment_overlap < "
                              f"max_frames={self.max_frames}")


@dataclass
class VaeConfig:
    path: str = "tiny"  # a local diffusers AutoencoderKL dir (the SDXL VAE), or 'tiny'
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype of the encoder (METHOD.md: fp32)
    batch_size: int = 16  # frames per encoder call
    # `precompute.latents: sample` (and inference's context encode): a posterior draw with per-frame seeds,
    # or the mode; the `posterior` form stores the posterior itself and ignores it
    sample: Literal["sample", "mode"] = "sample"
    seed: int = 0  # base of the per-(video, frame) sampling seeds
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor got a GPU

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("path: got an empty string, expected a local AutoencoderKL dir or 'tiny'")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: got {self.batch_size}, expected a positive integer")


@dataclass
class PrecomputeRayConfig:
    """Placement on a cluster of any size. Decode tasks go to the nodes that hold `decode_resources`
    (custom resources given to `ray start --resources`; none: every node with CPUs), at most
    `decode_in_flight` segments per node between decode and encode, so each node's object store
    holds a bounded number of decoded segments. Encoders go where `encode_resources` are, spread."""
    address: Optional[str] = None  # null: RAY_ADDRESS (set by `ray job submit`) or a local Ray
    decode_in_flight: int = 4  # per node: segments decoded or waiting for an encoder, at most
    decode_cpus: float = 1.0
    decode_threads: int = 0  # FFmpeg threads per decode task; 0: as many as decode_cpus
    decode_resources: dict[str, float] = field(default_factory=dict)  # e.g. {video_decode: 1}
    encode_actors: int = 1
    encode_cpus: float = 1.0
    encode_gpus: float = 0.0
    encode_resources: dict[str, float] = field(default_factory=dict)
    max_retries: int = 3  # decode task retries and encoder actor restarts
    commit_threads: int = 2  # shard uploads overlap decoding and encoding

    def validate(self) -> None:
        for name in ("decode_in_flight", "encode_actors", "commit_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        for name in ("decode_cpus", "encode_cpus", "encode_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 0")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: got {self.max_retries}, expected >= 0")
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads: got {self.decode_threads}, expected >= 0")
        for name in ("decode_resources", "encode_resources"):
            for res, amount in getattr(self, name).items():
                if not isinstance(amount, (int, float)) or amount <= 0 or res in ("CPU", "GPU", "memory"):
                    raise ConfigError(f"{name}.{res}: got {amount!r}, expected a custom resource with a "
                                      "positive amount (CPU/GPU have their own keys)")


@dataclass
class PrecomputeConfig:
    inputs: InputsConfig = field(default_factory=lambda: InputsConfig(dir="runs/videos"))
    output: OutputConfig = field(default_factory=OutputConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    ray: PrecomputeRayConfig = field(default_factory=PrecomputeRayConfig)
    progress_every_s: float = 10.0
    # What a frame's latents hold (data/shard_format.py): `posterior`, the VAE posterior's mean and std
    # (2C channels; the trainer draws a fresh latent every step, as METHOD.md's reference does), or
    # `sample`, one draw fixed at precompute time (vae.sample/vae.seed; half the bytes).
    latents: Literal["posterior", "sample"] = "posterior"

    def validate(self) -> None:
        if self.progress_every_s <= 0:
            raise ConfigError(f"progress_every_s: got {self.progress_every_s}, expected a positive number")
        if self.latents not in ("posterior", "sample"):
            raise ConfigError(f"latents: got {self.latents!r}, expected 'posterior' or 'sample'")

    def dataset_dict(self) -> dict:
        """The fields that decide the dataset's bytes: hashed into index.json. A root that grows
        (data/precompute_plan.py) pins these without `inputs`: its later jobs list more inputs,
        possibly elsewhere (a longer list file), under the same settings."""
        d = dataclasses.asdict(self)
        for k in ("ray", "progress_every_s"):
            d.pop(k)
        d["inputs"].pop("storage_options")
        d["output"].pop("storage_options")
        d["output"].pop("root")
        # Settings that cannot change this dataset's bytes stay out, so older hashes still match.
        if not self.video.max_frames:
            d["video"].pop("long_videos")
        if not self.video.segment_overlap:
            d["video"].pop("segment_overlap")
        if self.latents == "sample":  # what every dataset of before the field held
            d.pop("latents")
        return d
