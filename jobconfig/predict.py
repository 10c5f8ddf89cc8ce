"""`predict:` section: next-clip generation and its evaluation (`vgpt predict`, the quickstart).

The defaults are the reference's inference (script/inference/inference_nv.sh and
LVM/pipeline.py `prompt_condition_frame_block_autoregressive_inference`): 24-frame
clips (`--gen_nums 24 24`), 50 Euler steps, image guidance 1.5, a window of 80
frames; before every clip after the first the whole history (the given context too)
decoded to uint8 frames and re-encoded with a fresh posterior draw (`history:
reencode`); the noise generator re-seeded with `seed` for every clip (`noise_seed:
same`); on a GPU the model in bf16 and the VAE in fp32 (`dtype: auto`). Its 56 clean
context frames and 48 generated ones are `vgpt predict`'s --context/--generate
defaults (orchestration/cli/predict.py). Its context noise (`--clean_image_noise_level`)
is 0: the context is used clean, and there is no knob.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from jobconfig.errors import ConfigError

HISTORIES = ("reencode", "latent")
NOISE_SEEDS = ("same", "per_clip")
DTYPES = ("auto", "fp32", "bf16")


@dataclass
class PredictConfig:
    """Video prediction (METHOD.md, Inference) and its evaluation: `vgpt predict`, the quickstart."""
    steps: int = 50                 # Euler steps of the flow from t=0 (noise) to t=1 (clean)
    guidance: float = 1.5           # image guidance: uncond + g * (cond - uncond); 1.0 turns it off
    clip_frames: int = 24           # frames generated per clip
    # frames in one sequence: the newest clean context frames (kept frame by frame) + the clip being generated
    max_frame_window: int = 80
    kv_cache: bool = True           # cache the clean history's keys/values (False: recompute every step)
    seed: int = 0
    # what the model sees of the history from the second clip on. reencode (the reference): every frame of
    # the window decoded to uint8 once (the given context from the latents the first clip saw), then the
    # window re-encoded before each clip with a fresh posterior draw. latent: the latents as sampled and as
    # first encoded, appended clip by clip (no VAE between clips: faster; a departure from the reference)
    history: Literal["reencode", "latent"] = "reencode"
    # same (the reference): every clip's noise from a generator re-seeded with `seed`; per_clip: clip k's
    # noise from a seed derived from (seed, k)
    noise_seed: Literal["same", "per_clip"] = "same"
    # compute dtype of the model: auto = bf16 on a GPU (the reference), fp32 on the CPU; the VAE always
    # runs in fp32 (the reference's), whatever the dataset's encoder dtype was
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    i3d_path: Optional[str] = None  # local TorchScript I3D (e.g. i3d_torchscript.pt) for FVD; never downloaded

    def validate(self) -> None:
        for name in ("steps", "clip_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.guidance < 0:
            raise ConfigError(f"guidance: got {self.guidance}, expected >= 0 (1.0 = no guidance)")
        # the window drops the oldest context frame by frame (as the reference does), so one context
        # frame next to a full clip is enough
        if self.max_frame_window <= self.clip_frames:
            raise ConfigError(f"max_frame_window: got {self.max_frame_window}, expected > clip_frames="
                              f"{self.clip_frames} (at least one context frame plus the clip being generated)")
        for name, allowed in (("history", HISTORIES), ("noise_seed", NOISE_SEEDS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: got {getattr(self, name)!r}, expected one of {list(allowed)}")
