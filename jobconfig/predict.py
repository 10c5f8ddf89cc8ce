"""`predict:` section: next-clip generation and its evaluation (`vgpt predict`, the quickstart).

The defaults are the reference's inference script (script/inference/inference_nv.sh):
24-frame clips (`--gen_nums 24 24`), 50 Euler steps, image guidance 1.5, a window of
80 frames. Its 56 clean context frames and 48 generated ones are `vgpt predict`'s
--context/--generate defaults (orchestration/cli/predict.py). Its context noise
(`--clean_image_noise_level`) is 0: the context is used clean, and there is no knob.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jobconfig.errors import ConfigError


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
