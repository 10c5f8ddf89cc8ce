"""Video-GPT: latents in, clean-latent prediction for every noisy frame out.

Plain single-device PyTorch. Build with `build_model(cfg, device)`: modules are
created on `meta` (no memory, no init cost even at 3.8B) and materialised with
`to_empty` + `init_weights`, which also recomputes the non-persistent buffers
(sin-cos table, RoPE frequencies). Parallelism is applied from outside.

Pieces (METHOD.md, Tokens / Objective): two patch embedders (noisy, clean), a
2D sin-cos position table cropped from a 192x192 grid, three learned token rows
(the diffusion marker before each noisy frame, <img> and </img> around each
clean frame), a time token per noisy frame, the Phi-3-architecture backbone,
and a DiT final layer whose adaLN is driven by a second timestep embedder.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from data.batch import patches_per_frame
from jobconfig.errors import ConfigError
from jobconfig.model import ModelConfig
from pretrain.model.attention import ClipMeta, make_attention
from pretrain.model.backbone import Backbone, RMSNorm, load_phi3_backbone
from pretrain.model.sequence import SRC_CLEAN, SRC_NOISY, SRC_TIME, SequenceTables, build_sequence

# the rows of `VideoGPT.special_tokens`, in the order of the SRC_MARKER.. token kinds of sequence.py
SPECIAL_TOKENS = ("<|diffusion|>", "<img>", "</img>")


def sincos_2d_table(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """[grid, grid, dim] 2D sin-cos embedding, as the reference's `get_2d_sincos_pos_embed`.

    Coordinates are i * base_size / grid (i / 3 for the reference's 192 and 64),
    computed in float32 as the reference does; the first half of the channels
    encodes the column, the second the row; each half is [sin, cos] over
    frequencies 1e4^(-m / (dim/4)). The arithmetic follows the reference step by
    step so that the table, a buffer of its checkpoints, matches it bit for bit.
    """
    def one_axis(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)
    cols, rows = np.meshgrid(coords, coords)  # [row, col] grids of the column and row coordinate
    emb = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float().view(grid, grid, dim)


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t times `dim/2` frequencies; t enters raw, in [0, 1] (the reference does not scale it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.freq_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, h, w] -> [N, P, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    """DiT final layer: LayerNorm without affine, adaLN shift/scale, linear to patch*patch*C."""

    def __init__(self, hidden: int, patch: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class VideoGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.latent_channels
        self.noisy_embedder = PatchEmbed(C, D, p)
        self.clean_embedder = PatchEmbed(C, D, p)
        self.register_buffer("pos_table", torch.empty(cfg.pos_embed_max_size, cfg.pos_embed_max_size, D),
                             persistent=False)
        # rows of the reference's token embedding that Video-GPT uses: <|diffusion|>, <img>, </img>
        self.special_tokens = nn.Parameter(torch.empty(len(SPECIAL_TOKENS), D))
        self.time_token = TimestepEmbedder(D, cfg.time_freq_dim)
        self.backbone = Backbone(cfg)
        self.final_time = TimestepEmbedder(D, cfg.time_freq_dim)
        self.final_layer = FinalLayer(D, p, C)

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """The reference's initialisation (METHOD.md, Initialisation).

        Backbone and token rows as transformers initialises Phi-3: normal(init_std),
        norms one. Noisy patch embedder zero; clean patch embedder xavier on its 2D
        view; both time MLPs normal(init_std) weights; adaLN and output layer zero;
        every bias zero.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std

        def normal_(t, s):
            t.copy_(torch.randn(t.shape, generator=gen) * s)

        def xavier_(w):  # on the 2D view, as DiT does for the patch conv
            fan_out, fan_in = w.shape[0], w[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * bound)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                normal_(m.weight, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.noisy_embedder.proj.weight.zero_()
        self.noisy_embedder.proj.bias.zero_()
        xavier_(self.clean_embedder.proj.weight)
        self.clean_embedder.proj.bias.zero_()
        normal_(self.special_tokens, std)
        # DiT: the output head starts at zero, so the first prediction is 0
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            lin.weight.zero_()
            lin.bias.zero_()
        self.pos_table.copy_(sincos_2d_table(self.cfg.hidden_size, self.cfg.pos_embed_max_size,
                                             self.cfg.pos_embed_base_size))

    # ------------------------------------------------------------ forward
    def positions_2d(self, h: int, w: int) -> torch.Tensor:
        """Center crop of the sin-cos table for an h x w patch grid: [h*w, D]."""
        G = self.cfg.pos_embed_max_size
        if h > G or w > G:
            raise ConfigError(f"latent grid {h}x{w} patches exceeds model.pos_embed_max_size={G}")
        top, left = (G - h) // 2, (G - w) // 2
        return self.pos_table[top:top + h, left:left + w].reshape(h * w, -1)

    def sequence(self, clips, latent_hw: tuple[int, int]) -> SequenceTables:
        p = self.cfg.patch_size
        h, w = latent_hw
        if h % p or w % p:
            raise ConfigError(f"latent size {h}x{w} is not a multiple of model.patch_size={p}")
        return build_sequence(clips, patches_per_frame(latent_hw, p), self.cfg.max_tokens, device=self.pos_table.device)

    def forward(self, x_noisy: torch.Tensor, x_clean: torch.Tensor, t: torch.Tensor,
                seq: SequenceTables) -> torch.Tensor:
        """x_noisy, x_clean: [B, F, C, h, w]; t: [B, F] per-frame noise level; -> x1 prediction [B, F, C, h, w].

        Every frame is embedded twice (noisy and clean); the sequence tables pick
        which copies appear and where, so frames of the last clip, whose clean
        copy is unused, cost only one patch-embedding.
        """
        B, F, C, h, w = x_noisy.shape
        if C != self.cfg.latent_channels:
            raise ConfigError(f"latents: got {C} channels, expected {self.cfg.latent_channels} (model.latent_channels)")
        p, D = self.cfg.patch_size, self.cfg.hidden_size
        P = patches_per_frame((h, w), p)
        noisy = self.embed_patches(x_noisy.flatten(0, 1), noisy=True).reshape(B, F * P, D)
        clean = self.embed_patches(x_clean.flatten(0, 1), noisy=False).reshape(B, F * P, D)
        time = self.time_token(t).to(noisy.dtype)  # [B, F, D]
        specials = torch.cat([self.special_tokens.to(noisy.dtype), noisy.new_zeros(1, D)])  # + padding's row
        table = torch.cat([noisy, clean, time, specials.expand(B, -1, D)], dim=1)
        # flat index into `table` for every token: patches by (frame, patch), time by frame, specials by kind
        offsets = torch.tensor([0, F * P, 2 * F * P] + [2 * F * P + F + i for i in range(len(SPECIAL_TOKENS) + 1)],
                               device=table.device)
        local = torch.where(seq.src <= SRC_CLEAN, seq.frame * P + seq.patch,
                            torch.where(seq.src == SRC_TIME, seq.frame, torch.zeros_like(seq.frame)))
        index = offsets[seq.src] + local
        tokens = table.gather(1, index[..., None].expand(-1, -1, D))

        meta = ClipMeta.of(seq)
        attn = make_attention(meta, self.cfg.attention, tokens.device, self.cfg.dense_max_tokens)
        hidden = self.backbone(tokens, seq.position, attn)

        # every frame has exactly one noisy copy: scatter its patch outputs back to [B, F*P, D]
        noisy_out_index = self._noisy_token_index(seq, F, P)
        out = hidden.gather(1, noisy_out_index[..., None].expand(-1, -1, D))
        return self.output_head(out.view(B * F, P, D), t.reshape(B * F), (h, w)).view(B, F, C, h, w)

    # pieces shared with inference (pretrain/inference/sampler.py), which assembles its own token sequences
    def embed_patches(self, x: torch.Tensor, noisy: bool) -> torch.Tensor:
        """[N, C, h, w] latents -> [N, P, D] patch tokens with the 2D position embedding."""
        p = self.cfg.patch_size
        # inputs follow the weights' dtype (bf16 under a bf16 engine); the loss stays in float32
        embedder = self.noisy_embedder if noisy else self.clean_embedder
        x = x.to(embedder.proj.weight.dtype)
        return embedder(x) + self.positions_2d(x.shape[-2] // p, x.shape[-1] // p).to(x.dtype)

    def output_head(self, hidden: torch.Tensor, t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Final hidden states of N noisy frames' patches [N, P, D] and their t [N] -> x1 [N, C, h, w]."""
        out = self.final_layer(hidden, self.final_time(t).to(hidden.dtype))
        return self._unpatchify(out, out.shape[0], 1, self.cfg.latent_channels, *latent_hw)[:, 0]

    @staticmethod
    def _noisy_token_index(seq: SequenceTables, F: int, P: int) -> torch.Tensor:
        B, L = seq.src.shape
        is_patch = seq.src == SRC_NOISY
        slot = torch.where(is_patch, seq.frame * P + seq.patch, torch.full_like(seq.frame, F * P))
        index = torch.zeros(B, F * P + 1, dtype=torch.long, device=seq.src.device)
        index.scatter_(1, slot, torch.arange(L, device=seq.src.device).expand(B, L))
        # padding frames (past a row's frames) point at token 0: computed, never in the loss
        return index[:, :F * P]

    def _unpatchify(self, out: torch.Tensor, B: int, F: int, C: int, h: int, w: int) -> torch.Tensor:
        p = self.cfg.patch_size
        out = out.view(B, F, h // p, w // p, p, p, C)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, F, C, h, w)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> VideoGPT:
    """Construct on `meta`, materialise on `device`, initialise; load Phi-3 weights if configured."""
    with torch.device("meta"):
        model = VideoGPT(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    if cfg.phi3_checkpoint:
        load_phi3_backbone(model.backbone, cfg.phi3_checkpoint)
    return model.to(dtype)
