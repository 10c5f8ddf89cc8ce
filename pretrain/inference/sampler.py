"""Video prediction: autoregressive next-clip generation (METHOD.md, Inference).

Given clean context latents, each new clip starts from Gaussian noise and is
integrated with `steps` Euler steps of the rectified flow from t=0 to t=1
(linspace(0, 1, steps+1), no shift). The model predicts x1; the flow velocity
is (x1_hat - x_t) / (1 - t), so the last step lands exactly on x1_hat. Image
guidance mixes a conditional prediction (the clip attends to the clean
history) with an unconditional one (the same noisy clip alone, at frame slot
0): x1 = u + g * (c - u). The finished clip joins the history as clean
frames, without context noise. The history is a sliding window of the newest
frames, at most `max_frame_window` together with the clip being generated;
its position ids restart at slot 0 of the window. This is the reference's
`prompt_condition_frame_block_autoregressive_inference` (LVM/pipeline.py), with
two of its choices as options:
  history       before every clip after the first the reference decodes the
                history to uint8 frames and re-encodes it with a fresh
                posterior draw; `predict` takes that as a `refresh` callback
                (pretrain/inference/pipeline.py `HistoryReencoder`), which
                replaces the window's latents. Without one (predict.history:
                latent) the sampled latents are appended as they are.
  noise_seed    the reference re-seeds its noise generator with the same seed
                for every clip (`same`, the default) and draws the clip's
                noise frame by frame, [1, C, h, w] each; `per_clip` seeds
                clip k from (seed, k).
The Euler state stays float32 whatever the model's dtype (the reference keeps
it in the model's dtype, bf16 on a GPU); the model's prediction is cast up.
Guidance 1.0 returns every generated frame (the reference keeps only the first
half of its samples, `samples[:len // 2]`, which is right only with guidance on).

Two interchangeable ways to evaluate the model at one Euler step:
  kv_cache=True   the clean stream is frame-causal, so the history's keys and
                  values of every layer do not depend on how it is cut into
                  clips: they are computed once per window, frame by frame
                  (each frame attends to the cached frames before it and, inside
                  itself, by role), and every Euler step runs only the noisy
                  clip's tokens against them. Appending frames to an unchanged
                  window is incremental; a window that slid is rebuilt (its
                  positions moved), and so is one whose latents a `refresh`
                  replaced (every clip under predict.history: reencode). One
                  clip's Euler steps always share one cache.
  kv_cache=False  the whole training-time token sequence [noisy/clean history,
                  noisy clip] through `VideoGPT.forward` at every step: the
                  reference the cache is tested against (the reference's own
                  inference recomputes so).
Both see the same tokens at the same positions under the same rule, so they
agree to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from data.batch import patches_per_frame
from jobconfig.errors import ConfigError
from jobconfig.predict import PredictConfig
from pretrain.model.videogpt import VideoGPT
from pretrain.training.objective import row_seed


# (whole latent history [H, C, h, w], first frame of the window, clip index) -> new latents of history[start:]
Refresh = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass
class _Cache:
    """Per-layer keys/values of the clean history window, in preallocated buffers.

    The clip being denoised writes its own keys/values into the scratch space
    after `length` and attends to the buffer up to its end, so no Euler step
    copies the history.
    """
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    start: int = 0    # history index of the window's first frame (its slot 0)
    frames: int = 0   # history frames cached, from `start` on
    length: int = 0   # tokens cached


@dataclass
class PredictStats:
    model_calls: int = 0       # backbone evaluations (a guided step is one batched call)
    cache_rebuilds: int = 0    # windows whose cache was rebuilt from scratch
    cache_appends: int = 0     # frames appended to a live cache


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
    def predict(self, context: torch.Tensor, num_frames: int, refresh: Refresh | None = None) -> torch.Tensor:
        """context latents [N, C, h, w] -> the next `num_frames` latents [M, C, h, w] (float32).

        `refresh(history, start, clip)`: called before every clip after the first with the whole
        latent history [H, C, h, w] (context, then every generated frame) and the first frame of
        the clip's window; returns new latents for history[start:] (the reference re-encodes them).
        """
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
        history = context.float().to(device)
        self._cache = None
        out, done = [], 0
        while done < num_frames:
            size = min(self.cfg.clip_frames, num_frames - done)
            start = max(0, len(history) - (self.cfg.max_frame_window - size))  # the newest frames that fit
            if refresh is not None and out:
                window = refresh(history, start, len(out)).float().to(device)
                if window.shape != history[start:].shape:
                    raise ValueError(f"refresh: returned {tuple(window.shape)} for the window "
                                     f"{tuple(history[start:].shape)}")
                history = torch.cat([history[:start], window])
                self._cache = None  # new latents: every cached key/value is stale
            x = self.noise(len(out), size, tuple(context.shape[1:])).to(device)
            if self.cfg.kv_cache:
                self._prepare_cache(history, start)
            for i in range(self.cfg.steps):
                t = i / self.cfg.steps
                x1 = self._guided_x1(x, t, history[start:])
                x = x + (x1 - x) / (1.0 - t) * (1.0 / self.cfg.steps)
            history = torch.cat([history, x])
            out.append(x)
            done += size
        return torch.cat(out).cpu()

    def noise(self, clip: int, size: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Clip `clip`'s starting noise [size, *shape], float32: the reference's draws (a generator
        seeded per clip, one [1, *shape] draw per frame), always from a CPU generator so that a
        seed means the same noise on every device (the reference's generator lives on its device:
        the same numbers on a CPU run only)."""
        seed = self.cfg.seed if self.cfg.noise_seed == "same" else row_seed(self.cfg.seed, clip, salt=7)
        g = torch.Generator().manual_seed(seed)
        return torch.cat([torch.randn((1, *shape), generator=g) for _ in range(size)])

    def _guided_x1(self, x: torch.Tensor, t: float, window: torch.Tensor) -> torch.Tensor:
        guided = self.cfg.guidance != 1.0
        self.stats.model_calls += 1
        if self.cfg.kv_cache:
            preds = self._denoise_cached(x, t, len(window), guided)
        else:
            preds = self._denoise_recompute(x, t, window, guided)
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

    def _specials(self, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The marker, <img> and </img> rows, each [1, D]."""
        rows = self.model.special_tokens.to(dtype)
        return rows[0:1], rows[1:2], rows[2:3]

    def _clean_frame_tokens(self, frame: torch.Tensor, slot: int):
        """One clean frame at window slot `slot` -> tokens [1, L, D] ([<img>][patches][</img>]), positions [1, L]."""
        patches = self.model.embed_patches(frame[None], noisy=False)[0]      # [P, D]
        _, img_open, img_close = self._specials(patches.dtype)
        tokens = torch.cat([img_open, patches, img_close])[None]
        pos = (slot * self._slot() + torch.arange(self._slot(), device=frame.device))[None]
        return tokens, pos

    def _noisy_tokens(self, x: torch.Tensor, t: float, first_slots: list[int]):
        """One noisy clip per row, at its own first slot: tokens [B, n*L, D], positions [B, n*L].

        Tokens are ordered [n markers][n time tokens][n*P patches] rather than frame by
        frame: positions carry the order for RoPE, and grouped by role each kind's keys
        are a prefix of the clip's (markers see markers, time tokens markers and time
        tokens, patches all), so the rule needs no mask.
        """
        m, n, D = self.model, len(x), self.model.cfg.hidden_size
        L, P = self._slot(), self._patches
        patches = m.embed_patches(x, noisy=True).reshape(n * P, D)
        time = m.time_token(torch.full((n,), t, device=x.device)).to(patches.dtype)
        marker = self._specials(patches.dtype)[0].expand(n, D)
        tokens = torch.cat([marker, time, patches])[None].expand(len(first_slots), -1, -1)
        frame = torch.arange(n, device=x.device)
        local = torch.cat([frame * L, frame * L + 1, (frame[:, None] * L + 2 + torch.arange(P, device=x.device)).reshape(-1)])
        pos = torch.stack([s * L + local for s in first_slots])
        return tokens, pos

    def _head(self, hidden: torch.Tensor, n: int, t: float) -> torch.Tensor:
        """Backbone output of noisy-clip tokens [B, n*L, D] -> x1 [B, n, C, h, w] (float32)."""
        B, D = hidden.shape[0], hidden.shape[-1]
        patches = hidden[:, 2 * n:].reshape(B * n, self._patches, D)
        tt = torch.full((B * n,), t, device=hidden.device)
        return self.model.output_head(patches, tt, self._hw).float().view(B, n, -1, *self._hw)

    @staticmethod
    def _attend_by_role(q, k, v, prefix: int, n: int) -> torch.Tensor:
        """Noisy-clip queries [.., n*L, d] ordered by role against keys [.., prefix + n*L, d]."""
        groups = ((0, n, prefix + n), (n, 2 * n, prefix + 2 * n), (2 * n, q.shape[2], k.shape[2]))
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :end], v[:, :, :end])
                          for a, b, end in groups], dim=2)

    # ------------------------------------------------------------ KV-cache path
    def _prepare_cache(self, history: torch.Tensor, start: int) -> None:
        cache = self._cache
        if cache is None or cache.start != start:
            cache = self._cache = self._empty_cache(history)
            cache.start = start
            self.stats.cache_rebuilds += 1
        else:
            self.stats.cache_appends += len(history) - start - cache.frames
        while start + cache.frames < len(history):
            self._append_clean_frame(cache, history[start + cache.frames])

    def _empty_cache(self, example: torch.Tensor) -> _Cache:
        mc = self.model.cfg
        capacity = self.cfg.max_frame_window * self._slot()
        dtype = self.model.noisy_embedder.proj.weight.dtype
        shape = (1, mc.num_heads, capacity, mc.head_dim)
        make = lambda: torch.empty(shape, dtype=dtype, device=example.device)  # noqa: E731
        return _Cache([make() for _ in range(mc.num_layers)], [make() for _ in range(mc.num_layers)])

    def _append_clean_frame(self, cache: _Cache, frame: torch.Tensor) -> None:
        tokens, pos = self._clean_frame_tokens(frame, cache.frames)
        a, b = cache.length, cache.length + tokens.shape[1]
        # the frame sees every cached frame, and inside itself the tokens of its role or before
        roles = torch.tensor([0] + [1] * self._patches + [2], device=frame.device)
        mask = torch.cat([torch.ones(len(roles), a, dtype=torch.bool, device=frame.device),
                          roles[None, :] <= roles[:, None]], dim=1)

        def attend(layer, q, k, v):
            cache.k[layer][:, :, a:b] = k
            cache.v[layer][:, :, a:b] = v
            return F.scaled_dot_product_attention(q, cache.k[layer][:, :, :b], cache.v[layer][:, :, :b],
                                                  attn_mask=mask)

        self.model.backbone(tokens, pos, _LayerCounter(attend))
        cache.length, cache.frames = b, cache.frames + 1

    def _denoise_cached(self, x: torch.Tensor, t: float, history_frames: int, guided: bool) -> torch.Tensor:
        cache = self._cache
        n = len(x)
        slots = [history_frames] + ([0] if guided else [])
        tokens, pos = self._noisy_tokens(x, t, slots)
        a, b = cache.length, cache.length + tokens.shape[1]

        def attend(layer, q, k, v):
            # conditional row: the cached clean history and the clip itself
            cache.k[layer][:, :, a:b] = k[:1]
            cache.v[layer][:, :, a:b] = v[:1]
            cond = self._attend_by_role(q[:1], cache.k[layer][:, :, :b], cache.v[layer][:, :, :b], a, n)
            if not guided:
                return cond
            # unconditional row: the history dropped, the clip sees only itself
            return torch.cat([cond, self._attend_by_role(q[1:], k[1:], v[1:], 0, n)])

        hidden = self.model.backbone(tokens, pos, _LayerCounter(attend))
        return self._head(hidden, n, t)

    # ------------------------------------------------------------ recompute path
    def _denoise_recompute(self, x: torch.Tensor, t: float, window: torch.Tensor, guided: bool) -> torch.Tensor:
        """The training-time forward over [history, noisy clip] (and [noisy clip] alone).

        The history is one clean clip: frame-causal, its partition into clips changes nothing.
        """
        n, H = len(x), len(window)
        frames = H + n
        clean = torch.cat([window, x])  # the new clip's clean copy is never used (last clip)
        noisy = torch.cat([window, x])  # history noisy copies are never seen by the last clip
        t_row = torch.cat([torch.ones(H), torch.full((n,), t)]).to(x.device)
        clips = [[[H, n] if H else [n]]]
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
