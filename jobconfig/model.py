"""`model:` section: the Video-GPT shape (a preset of configs/model/ plus overrides).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from jobconfig.errors import ConfigError

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
    pos_embed_base_size: int = 64  # the table's coordinates are i * base / max (the reference: i / 3)
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-5
    time_freq_dim: int = 256
    init_std: float = 0.02
    attention: AttentionBackend = "auto"
    max_tokens: int = 1_280_000  # per packed sequence; longer sequences are refused
    dense_max_tokens: int = 8192  # the dense reference materialises L x L: tests only
    phi3_checkpoint: Optional[str] = None  # local dir with config.json + *.safetensors

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_size", "latent_channels", "patch_size",
                     "pos_embed_max_size", "pos_embed_base_size"):
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
