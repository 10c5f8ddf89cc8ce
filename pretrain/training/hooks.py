"""The calls the Trainer makes at fixed points, for tooling outside the training code (fault
injection, orchestration/faults.py). Apart from the Trainer so that the tooling can name them
without importing the training stack: the precompute farm's Ray workers load the fault switches
too, and each would otherwise import the whole trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class TrainerHooks:
    """Each is optional. `after_step` gets the Trainer (typed Any: naming its class would import it)."""
    after_step: Callable[[Any], None] | None = None       # after a step is recorded (and saved)
    before_checkpoint_commit: Callable[[int], None] | None = None  # rank 0, files written, manifest not yet
