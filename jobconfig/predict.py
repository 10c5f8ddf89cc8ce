"""`predict:` section: next-clip generation and its evaluation (`vgpt predict`, the quickstart).
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
