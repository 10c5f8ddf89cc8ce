"""Video prediction: autoregressive next-clip generation (METHOD.md, Inference).

Given clean context latents, each new clip starts from Gaussian noise and is
integrated with `steps` Euler steps of the rectified flow from t=0 to t=1. The
model predicts x1; the flow velocity is (x1_hat - x_t) / (1 - t), so the last
step lands exactly on x1_hat. Image guidance mixes a conditional prediction
(the clip attends to the clean history) with an unconditional one (the same
noisy clip with the history dropped, placed at frame slot 0 as a first clip is
in training): x1 = u + g * (c - u). The finished clip joins the history as
clean context. The history is a sliding window of whole clips holding at most
`max_frame_window` frames together with the clip being generated; its
position ids restart at slot 0 of the window, as every training sample does.

Two interchangeable ways to evaluate the model at one Euler step:
  kv_cache=True   the clean history's keys/values of every layer are computed
                  once per window (clip by clip: a clean clip attends to the
                  cached clips before it and to itself, exactly the clip rule)
                  and every Euler step runs only the noisy clip's tokens
                  against them. Appending a clip to an unchanged window is
                  incremental; a window that slid is rebuilt (its positions moved).
  kv_cache=False  the whole training-time token sequence [noisy/clean history ...
                  noisy clip] through `VideoGPT.forward` at every step: the
                  reference the cache is tested against.
Both see the same tokens at the same positions under the same rule, so they
agree to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data.batch import patches_per_frame
from jobconfig.errors import ConfigError
from jobconfig.predict import PredictConfig
from pretrain.model.videogpt import VideoGPT
from pretrain.training.objective import row_seed


@dataclass
class _Cache:
    """Per-layer keys/values of the clean history window, in preallocated buffers.

    The clip being denoised writes its own keys/values into the scratch space
    after `length` and attends to the buffer up to its end, so no Euler step
    copies the history.
    """
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    clip_ids: list[int] = field(default_factory=list)  # history clips covered, oldest first
    frames: int = 0
    length: int = 0


@dataclass
class PredictStats:
    model_calls: int = 0       # backbone evaluations (a guided step is one batched call)
    cache_rebuilds: int = 0    # windows whose cache was rebuilt from scratch
    cache_appends: int = 0     # clips appended to a live cache


class _LayerCounter:
    """The backbone calls `attn(q, k, v)` once per layer, in order; this tells each call its layer."""

    def __init__(self, fn):
        self.fn, self.layer = fn, 0

    def __call__(self, q, k, v):
        out = self.fn(self.layer, q, k, v)
        self.layer += 1
        return out


class NextClipPredictor:
    def __init__(self, model: VideoGPT, cfg: PredictConfig):
        cfg.validate()
        self.model, self.cfg = model.eval(), cfg
        self.stats = PredictStats()
        self._cache: _Cache | None = None

    # ------------------------------------------------------------ public
    @torch.no_grad()
    def predict(self, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """context latents [N, C, h, w] -> the next `num_frames` latents [M, C, h, w] (float32)."""
        mc = self.model.cfg
        if context.ndim != 4 or context.shape[1] != mc.latent_channels:
            raise ConfigError(f"context: expected latents [N, {mc.latent_channels}, h, w] "
                              f"(model.latent_channels={mc.latent_channels}), got {tuple(context.shape)}")
        if len(context) < 1 or num_frames < 1:
            raise ConfigError(f"need at least 1 context frame and 1 frame to generate, got {len(context)} "
                              f"and {num_frames}")
        p = mc.patch_size
        if context.shape[-1] % p or context.shape[-2] % p:
            raise ConfigError(f"context: latent size {tuple(context.shape[-2:])} is not a multiple of "
                              f"model.patch_size={p}")
        device = self.model.pos_table.device
        self._set_grid(tuple(context.shape[-2:]))
        c = self.cfg.clip_frames
        # the context as clips of clip_frames, the newest clip full; the oldest takes the remainder
        n = len(context)
        bounds = ([0] if n % c else []) + list(range(n % c, n + 1, c))
        history = [context[a:b].float().to(device) for a, b in zip(bounds, bounds[1:])]
        self._cache = None
        out = []
        while sum(len(x) for x in out) < num_frames:
            size = min(c, num_frames - sum(len(x) for x in out))
            window = self._window(history, size)
            g = torch.Generator().manual_seed(row_seed(self.cfg.seed, len(out), salt=7))
            x = torch.randn((size, *context.shape[1:]), generator=g).to(device)
            if self.cfg.kv_cache:
                self._prepare_cache(history, window)
            for i in range(self.cfg.steps):
                t = i / self.cfg.steps
                x1 = self._guided_x1(x, t, history, window)
                x = x + (x1 - x) / (1.0 - t) * (1.0 / self.cfg.steps)
            history.append(x)
            out.append(x)
        return torch.cat(out).cpu()

    # ------------------------------------------------------------ window
    def _window(self, history: list[torch.Tensor], size: int) -> list[int]:
        """Indices of the newest whole clips that fit max_frame_window with the new clip.

        Never empty: clips hold at most clip_frames frames and the window at least twice that."""
        budget, picked = self.cfg.max_frame_window - size, []
        for i in range(len(history) - 1, -1, -1):
            if len(history[i]) > budget:
                break
            budget -= len(history[i])
            picked.append(i)
        return picked[::-1]

    def _guided_x1(self, x: torch.Tensor, t: float, history, window: list[int]) -> torch.Tensor:
        guided = self.cfg.guidance != 1.0
        self.stats.model_calls += 1
        if self.cfg.kv_cache:
            preds = self._denoise_cached(x, t, sum(len(history[i]) for i in window), guided)
        else:
            preds = self._denoise_recompute(x, t, [history[i] for i in window], guided)
        if not guided:
            return preds[0]
        cond, uncond = preds
        return uncond + self.cfg.guidance * (cond - uncond)

    # ------------------------------------------------------------ tokens
    def _slot(self) -> int:
        return self._patches + 2

    def _set_grid(self, hw: tuple[int, int]) -> None:
        """Latent size and patches per frame of the video being predicted (one per `predict` call)."""
        p = self.model.cfg.patch_size
        self._hw, self._patches = hw, patches_per_frame(hw, p)

    def _clean_tokens(self, frames: torch.Tensor, first_slot: int):
        """Clean frames at window slots first_slot.. -> tokens [1, n*P, D], positions [1, n*P]."""
        P, S = self._patches, self._slot()
        tokens = self.model.embed_patches(frames, noisy=False).reshape(1, -1, self.model.cfg.hidden_size)
        slots = torch.arange(first_slot, first_slot + len(frames), device=frames.device)
        pos = (slots[:, None] * S + 2 + torch.arange(P, device=frames.device)).reshape(1, -1)
        return tokens, pos

    def _noisy_tokens(self, x: torch.Tensor, t: float, first_slots: list[int]):
        """One noisy clip per row, each row at its own first slot: tokens [B, n*S, D], positions [B, n*S]."""
        m, n, D = self.model, len(x), self.model.cfg.hidden_size
        S = self._slot()
        patches = m.embed_patches(x, noisy=True)                           # [n, P, D]
        tt = torch.full((n,), t, device=x.device)
        time = m.time_token(tt).to(patches.dtype)[:, None]                 # [n, 1, D]
        marker = m.diffusion_marker.to(patches.dtype).expand(n, 1, D)
        frame_tokens = torch.cat([marker, time, patches], dim=1).reshape(1, n * S, D)
        tokens = frame_tokens.expand(len(first_slots), -1, -1)
        pos = torch.stack([(torch.arange(s, s + n, device=x.device)[:, None] * S +
                            torch.arange(S, device=x.device)).reshape(-1) for s in first_slots])
        return tokens, pos

    def _head(self, hidden: torch.Tensor, n: int, t: float) -> torch.Tensor:
        """Backbone output of noisy-clip tokens [B, n*S, D] -> x1 [B, n, C, h, w] (float32)."""
        B, D = hidden.shape[0], hidden.shape[-1]
        patches = hidden.view(B, n, self._slot(), D)[:, :, 2:].reshape(B * n, self._patches, D)
        tt = torch.full((B * n,), t, device=hidden.device)
        return self.model.output_head(patches, tt, self._hw).float().view(B, n, -1, *self._hw)

    # ------------------------------------------------------------ KV-cache path
    def _prepare_cache(self, history: list[torch.Tensor], window: list[int]) -> None:
        cache = self._cache
        reusable = cache is not None and cache.clip_ids == window[:len(cache.clip_ids)]
        if not reusable:
            cache = self._cache = self._empty_cache(history[window[0]])
            self.stats.cache_rebuilds += 1
        else:
            self.stats.cache_appends += len(window) - len(cache.clip_ids)
        for i in window[len(cache.clip_ids):]:
            self._append_clean_clip(cache, history[i])
            cache.clip_ids.append(i)

    def _empty_cache(self, example: torch.Tensor) -> _Cache:
        mc, P = self.model.cfg, self._patches
        capacity = (self.cfg.max_frame_window - 1) * P + self.cfg.clip_frames * self._slot()
        dtype = self.model.noisy_embedder.proj.weight.dtype
        shape = (1, mc.num_heads, capacity, mc.head_dim)
        make = lambda: torch.empty(shape, dtype=dtype, device=example.device)  # noqa: E731
        return _Cache([make() for _ in range(mc.num_layers)], [make() for _ in range(mc.num_layers)])

    def _append_clean_clip(self, cache: _Cache, frames: torch.Tensor) -> None:
        tokens, pos = self._clean_tokens(frames, cache.frames)
        a, b = cache.length, cache.length + tokens.shape[1]

        def attend(layer, q, k, v):  # a clean clip sees the clean clips before it and itself
            cache.k[layer][:, :, a:b] = k
            cache.v[layer][:, :, a:b] = v
            return F.scaled_dot_product_attention(q, cache.k[layer][:, :, :b], cache.v[layer][:, :, :b])

        self.model.backbone(tokens, pos, _LayerCounter(attend))
        cache.length, cache.frames = b, cache.frames + len(frames)

    def _denoise_cached(self, x: torch.Tensor, t: float, history_frames: int, guided: bool) -> torch.Tensor:
        cache = self._cache
        n = len(x)
        slots = [history_frames] + ([0] if guided else [])
        tokens, pos = self._noisy_tokens(x, t, slots)
        a, b = cache.length, cache.length + tokens.shape[1]

        def attend(layer, q, k, v):
            # conditional row: the cached clean history and the clip itself (bidirectional)
            cache.k[layer][:, :, a:b] = k[:1]
            cache.v[layer][:, :, a:b] = v[:1]
            cond = F.scaled_dot_product_attention(q[:1], cache.k[layer][:, :, :b], cache.v[layer][:, :, :b])
            if not guided:
                return cond
            # unconditional row: the history dropped, the clip sees only itself
            return torch.cat([cond, F.scaled_dot_product_attention(q[1:], k[1:], v[1:])])

        hidden = self.model.backbone(tokens, pos, _LayerCounter(attend))
        return self._head(hidden, n, t)

    # ------------------------------------------------------------ recompute path
    def _denoise_recompute(self, x: torch.Tensor, t: float, window: list[torch.Tensor], guided: bool) -> torch.Tensor:
        """The training-time forward over [history clips..., noisy clip] (and [noisy clip] alone)."""
        n, H = len(x), sum(len(c) for c in window)
        frames = H + n
        clean = torch.cat(window + [x])  # the new clip's clean copy is never used (last clip)
        noisy = torch.cat([torch.cat(window), x])  # history noisy copies are never seen by the last clip
        t_row = torch.cat([torch.ones(H), torch.full((n,), t)]).to(x.device)
        clips = [[[len(c) for c in window] + [n]]]
        lat_noisy, lat_clean, ts = [noisy], [clean], [t_row]
        if guided:
            pad = frames - n
            lat_noisy.append(torch.cat([x, torch.zeros_like(noisy[:pad])]))
            lat_clean.append(torch.cat([x, torch.zeros_like(noisy[:pad])]))
            ts.append(torch.cat([torch.full((n,), t), torch.ones(pad)]).to(x.device))
            clips.append([[n]])
        seq = self.model.sequence(clips, tuple(x.shape[-2:]))
        pred = self.model(torch.stack(lat_noisy), torch.stack(lat_clean), torch.stack(ts), seq).float()
        rows = [pred[0, H:]] + ([pred[1, :n]] if guided else [])
        return torch.stack(rows)
