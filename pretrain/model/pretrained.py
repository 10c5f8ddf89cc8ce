"""`VideoGPTTransformer`: Video-GPT as a diffusers model, so an export loads with `from_pretrained`.

Why: an export directory (`pretrain/checkpoint/export.py`: config.json plus
`diffusion_pytorch_model*.safetensors`, sharded with an index above the shard
size) is the Hugging Face layout; with this class, diffusers alone loads it:

    from pretrain.model.pretrained import VideoGPTTransformer
    model = VideoGPTTransformer.from_pretrained("runs/pretrain/stage4/export")

The class *is* a `VideoGPT` (a subclass, not a wrapper), so its parameter names
are the export's tensor names and its forward is ours. Its `__init__` takes the
`ModelConfig` fields, which `@register_to_config` records: diffusers' ConfigMixin
writes and reads them as config.json's keys. The export's provenance (format,
stage, step, init_from, data recipe) sits in config.json under the private key
`_videogpt` (export.PROVENANCE_KEY), which ConfigMixin keeps in `model.config`
(and writes back on `save_pretrained`) and never passes to `__init__`.
`phi3_checkpoint` is recorded for provenance only: the export holds the trained
weights, so the initial ones are never read.

diffusers is imported here at module level: this module is imported only where a
model is loaded this way, never by `vgpt --help` or the export writer.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from jobconfig.model import ModelConfig
from pretrain.model.videogpt import VideoGPT

_D = ModelConfig()


class VideoGPTTransformer(VideoGPT, ModelMixin, ConfigMixin):
    """Video-GPT loadable by `from_pretrained(dir)` and writable by `save_pretrained(dir)`.

    VideoGPT comes first in the bases so that its `__init__(cfg)` runs and hands on
    (through `super()`) to ModelMixin's and nn.Module's.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False
    # an import of the authors' release carries their whole token table beside our weights (orchestration/convert.py)
    _keys_to_ignore_on_load_unexpected = [r"^reference/"]

    @register_to_config
    def __init__(self, preset: str = _D.preset, hidden_size: int = _D.hidden_size, num_layers: int = _D.num_layers,
                 num_heads: int = _D.num_heads, mlp_size: int = _D.mlp_size,
                 latent_channels: int = _D.latent_channels, patch_size: int = _D.patch_size,
                 pos_embed_max_size: int = _D.pos_embed_max_size, pos_embed_base_size: int = _D.pos_embed_base_size,
                 rope_theta: float = _D.rope_theta, partial_rotary_factor: float = _D.partial_rotary_factor,
                 norm_eps: float = _D.norm_eps, time_freq_dim: int = _D.time_freq_dim, init_std: float = _D.init_std,
                 attention: str = _D.attention, max_tokens: int = _D.max_tokens,
                 dense_max_tokens: int = _D.dense_max_tokens, phi3_checkpoint: str | None = None):
        cfg = ModelConfig(preset=preset, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          mlp_size=mlp_size, latent_channels=latent_channels, patch_size=patch_size,
                          pos_embed_max_size=pos_embed_max_size, pos_embed_base_size=pos_embed_base_size,
                          rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor, norm_eps=norm_eps,
                          time_freq_dim=time_freq_dim, init_std=init_std, attention=attention,
                          max_tokens=max_tokens, dense_max_tokens=dense_max_tokens, phi3_checkpoint=phi3_checkpoint)
        cfg.validate()
        # as build_model: modules on meta (no memory, no default init), then materialised and initialised
        # with ours, which also computes the non-persistent sin-cos table that no weights file holds
        with torch.device("meta"):
            super().__init__(cfg)
        self.to_empty(device="cpu")
        self.init_weights()

