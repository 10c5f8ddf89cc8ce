"""What the loader's DataLoader workers send the main process: one message per step.

Each worker sends its part of a step as one item (the DataLoader's round-robin then lines the
parts up by step); the main process merges the parts of a step and collates the batch
(data/loader.py). Latents travel as pickled numpy bytes, cheaper here than torch's shared-memory
tensors (`to_wire`), and a worker's exception travels as an item too (`ReaderError`), to be
raised in the main process as itself.
"""
from __future__ import annotations

import pickle
import traceback
from typing import NamedTuple

import numpy as np
import torch

from data.batching import SampleRecord, copy_serial, numpy_view


def identity(x):
    return x


class Wire(NamedTuple):
    """A sample's latents between processes: numpy bytes (same-size ints) plus the torch dtype name."""
    array: np.ndarray
    dtype: str


def to_wire(chunk: list[SampleRecord]) -> list[SampleRecord]:
    """Worker side: latents as contiguous numpy arrays. They travel pickled through the worker's
    pipe: measured here, moving a fresh torch tensor into shared memory costs ~8 ms per step,
    pickling the same bytes ~0.05 ms. Copies use numpy (see batching.copy_serial)."""
    for r in chunk:
        if isinstance(r.latents, torch.Tensor):
            x = torch.empty(r.latents.shape, dtype=r.latents.dtype)
            copy_serial(x, r.latents)
            r.latents = Wire(numpy_view(x), str(x.dtype).split(".")[-1])
    return chunk


def from_wire(chunk: list[SampleRecord]) -> list[SampleRecord]:
    for r in chunk:
        if isinstance(r.latents, Wire):
            r.latents = torch.from_numpy(r.latents.array).view(getattr(torch, r.latents.dtype))
    return chunk


class ReaderError:
    """An exception of a worker, carried to the main process as a plain item."""

    def __init__(self, error: Exception, where: str):
        error.add_note(f"(raised in {where}:)\n{traceback.format_exc()}")
        try:
            pickle.dumps(error)
        except Exception:  # an unpicklable error would be lost between processes: send its text
            error = RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        self.error = error
