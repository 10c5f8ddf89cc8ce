"""Decoder-only transformer with the Phi-3 architecture, without a causal mask of its own.

RMSNorm, fused QKV, RoPE on explicit position ids (rotate-half convention, as
Phi-3), SwiGLU MLP with a fused gate/up projection. Attention is whatever
`attn(q, k, v)` callable the caller passes in: the clip attention op during
training, a causal mask in the Phi-3 parity test, a KV-cached call at
inference. Parameter names match Phi-3's checkpoints (minus the `model.`
prefix) so the reference's initialisation from Phi-3-mini is a plain load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for integer position ids; partial rotary as Phi-3's `partial_rotary_factor`.

    Frequencies are recomputed in float32 on every call rather than kept in a
    buffer: engines cast buffers to bf16 with the model, and a bf16 inverse
    frequency is off by up to 0.4%, i.e. by hundreds of radians of phase at the
    35k positions of a stage-4 sequence.
    """

    def __init__(self, head_dim: int, theta: float, partial: float = 1.0):
        super().__init__()
        self.rot_dim = int(head_dim * partial)
        self.theta = theta

    def inv_freq(self, device) -> torch.Tensor:
        exps = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim
        return 1.0 / (self.theta ** exps)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)  # [B, L, rot/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, L, rot]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * cos + _rotate_half(xr) * sin, xp], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn: AttnFn):
        B, L, _ = x.shape
        # heads from the qkv output width, not the config: tensor parallel shards it
        qkv = self.qkv_proj(x).view(B, L, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = apply_rope(qkv[0], cos, sin), apply_rope(qkv[1], cos, sin), qkv[2]
        out = attn(q, k, v)  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.mlp_size, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn: AttnFn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.partial_rotary_factor)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)


# ---------------------------------------------------------------- Phi-3 weights
_PHI3_SHAPE_KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                    "num_attention_heads": "num_heads", "intermediate_size": "mlp_size"}


def phi3_fields(hf: dict, where: str) -> dict:
    """A Phi3Config (a transformers config.json, as a dict) -> the ModelConfig fields it sets.

    The one reader of a Phi-3 config.json: a checkpoint to initialise from (`check_phi3_config`)
    and the authors' release (orchestration/convert.py) both come through here. What this
    backbone cannot compute as transformers' Phi-3 does is refused, naming the key."""
    def need(key):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise ConfigError(f"{where}: {key}={hf.get(key)!r}, expected a positive integer (a Phi3Config)")
        return hf[key]

    if hf.get("model_type", "phi3") != "phi3":
        raise ConfigError(f"{where}: model_type={hf['model_type']!r}, expected 'phi3'")
    heads = need("num_attention_heads")
    need("vocab_size")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"{where}: num_key_value_heads={hf['num_key_value_heads']} (grouped-query attention) "
                          f"is not supported, expected num_attention_heads={heads}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r}, expected 'silu'")
    if hf.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported (Phi-3 projections have no bias)")
    # transformers 5 nests RoPE settings in rope_parameters; 4.x keeps them at the top level
    rope = hf.get("rope_parameters") or {}
    for key, value in (("rope_scaling", hf.get("rope_scaling") or {}), ("rope_parameters", rope)):
        kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
        if kind != "default":
            raise ConfigError(f"{where}: {key} has RoPE type {kind!r}, only the default RoPE is supported "
                              "(a 4k-context Phi-3, as Video-GPT)")
    hidden = need("hidden_size")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"{where}: head_dim={hf['head_dim']}, expected hidden_size/num_attention_heads")
    return {"hidden_size": hidden, "num_layers": need("num_hidden_layers"), "num_heads": heads,
            "mlp_size": need("intermediate_size"),
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "partial_rotary_factor": float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-5)), "init_std": float(hf.get("initializer_range", 0.02))}


def check_phi3_config(cfg: ModelConfig, checkpoint_dir: str | Path) -> None:
    """The checkpoint's config.json must describe our backbone's shape."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.phi3_checkpoint: {path} not found (expected a transformers checkpoint directory)")
    theirs = phi3_fields(json.loads(path.read_text()), str(path))
    for hf_key, ours in _PHI3_SHAPE_KEYS.items():
        if theirs[ours] != getattr(cfg, ours):
            raise ConfigError(f"model.{ours}: {getattr(cfg, ours)} but {path} has {hf_key}={theirs[ours]}")
    for ours in ("rope_theta", "partial_rotary_factor", "norm_eps"):
        value = getattr(cfg, ours)
        if abs(theirs[ours] - value) > 1e-12 * max(1.0, abs(value)):
            raise ConfigError(f"model.{ours}: {value} but {path} has {theirs[ours]}")


def load_phi3_backbone(backbone: Backbone, checkpoint_dir: str | Path) -> list[str]:
    """Copy a local Phi-3 checkpoint's transformer weights into `backbone`.

    Reads only safetensors (no pickle). Returns the checkpoint keys it ignored
    (token embeddings, LM head): Video-GPT has no text vocabulary.
    """
    check_phi3_config(backbone.cfg, checkpoint_dir)
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.phi3_checkpoint: no *.safetensors in {checkpoint_dir}")
    ours = backbone.state_dict()
    loaded, ignored = set(), []
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    name = key.removeprefix("model.")
                    if name not in ours:
                        ignored.append(key)
                        continue
                    tensor = st.get_tensor(key)
                    if tensor.shape != ours[name].shape:
                        raise ConfigError(f"{f.name}: {key} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(ours[name].shape)}")
                    ours[name].copy_(tensor.to(ours[name].dtype))
                    loaded.add(name)
    missing = sorted(set(ours) - loaded)
    if missing:
        raise ConfigError(f"model.phi3_checkpoint: {checkpoint_dir} lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
    return ignored
