"""Sub-configs of the training side: model shape, objective, the interim train loop.

Plain dataclasses with a `validate()` that raises `ConfigError("key: why")`;
`orchestration.config` nests them into the job tree and prefixes the path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key path."""


AttentionBackend = Literal["auto", "flex", "blockwise", "dense"]


@dataclass
class ModelConfig:
    preset: str = "debug"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_size: int = 172
    latent_channels: int = 4
    patch_size: int = 2
    pos_embed_max_size: int = 192  # side of the 2D sin-cos table, in patches
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-5
    time_freq_dim: int = 256
    time_scale: float = 1000.0  # t in [0,1] is scaled before the sinusoid (DiT convention)
    init_std: float = 0.02
    attention: AttentionBackend = "auto"
    max_tokens: int = 1_280_000  # per packed sequence; longer sequences are refused
    dense_max_tokens: int = 8192  # the dense reference materialises L x L: tests only
    phi3_checkpoint: Optional[str] = None  # local dir with config.json + *.safetensors

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_size", "latent_channels", "patch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads: got {self.num_heads}, expected a divisor of hidden_size={self.hidden_size}")
        head_dim = self.hidden_size // self.num_heads
        rot = int(head_dim * self.partial_rotary_factor)
        if rot % 2 or not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor: got {self.partial_rotary_factor}, "
                              f"expected (0, 1] giving an even rotary dim of head_dim={head_dim}")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size: got {self.hidden_size}, expected a multiple of 4 (2D sin-cos table)")
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens: got {self.max_tokens}, expected a positive integer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size) * (latent_w // self.patch_size)


@dataclass
class ObjectiveConfig:
    """Rectified flow, x1 prediction (METHOD.md, Objective)."""
    context_noise_min: float = 0.9  # t_ctx ~ U(context_noise_min, 1): the reference's input_noise

    def validate(self) -> None:
        if not 0.0 <= self.context_noise_min <= 1.0:
            raise ConfigError(f"context_noise_min: got {self.context_noise_min}, expected a value in [0, 1]")


@dataclass
class TrainConfig:
    """The training loop: optimiser (METHOD.md defaults), schedule, budget, checkpoints."""
    steps: int = 200
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    batch_size: int = 1  # rows per rank per micro step of the synthetic source (the loader: data.batch_size)
    grad_accum_steps: int = 1
    seed: int = 0
    data: Literal["latents", "synthetic"] = "latents"  # the streaming loader (`data:`) or moving squares
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 3  # checkpoints kept besides every `keep_every`-th
    keep_every: int = 0
    init_from: Optional[str] = None  # a consolidated export (safetensors) to start from
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    out_dir: str = "runs/debug"
    tensorboard: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"lr: got {self.lr}, expected a positive number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: got {list(self.betas)}, expected two numbers in [0, 1)")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: got {self.checkpoint_every}, expected >= 0")


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


@dataclass
class PredictConfig:
    """Video prediction (METHOD.md, Inference) and its evaluation: `vgpt predict`, the quickstart."""
    steps: int = 50                 # Euler steps of the flow from t=0 (noise) to t=1 (clean)
    guidance: float = 1.5           # image guidance: uncond + g * (cond - uncond); 1.0 turns it off
    clip_frames: int = 1            # frames generated per clip (the context is split into clips of this size)
    max_frame_window: int = 80      # frames in one sequence: clean history window + the clip being generated
    kv_cache: bool = True           # cache the clean history's keys/values (False: recompute every step)
    seed: int = 0
    i3d_path: Optional[str] = None  # local TorchScript I3D (e.g. i3d_torchscript.pt) for FVD; never downloaded

    def validate(self) -> None:
        for name in ("steps", "clip_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.guidance < 0:
            raise ConfigError(f"guidance: got {self.guidance}, expected >= 0 (1.0 = no guidance)")
        if self.max_frame_window < 2 * self.clip_frames:
            raise ConfigError(f"max_frame_window: got {self.max_frame_window}, expected >= 2 * clip_frames="
                              f"{2 * self.clip_frames} (one clip of history plus the clip being generated)")
