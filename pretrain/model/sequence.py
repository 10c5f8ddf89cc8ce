"""The token sequence of a batch: how a row of clips becomes the model's tokens.

A row (`Batch.clips` of one row: packed samples, each a list of clip sizes)
becomes, per sample (METHOD.md, Tokens and sequence; the reference's
`train_helper/data.py` and `processor.py`),

    [noisy c1][clean c1][noisy c2][clean c2] ... [noisy cK]

where every frame of a noisy clip is `[diffusion marker][time token][P patches]`
and every frame of a clean clip is `[<img>][P patches][</img>]`. The marker and
the two delimiters are learned rows (`VideoGPT.special_tokens`, rows of the
reference's token embedding). Samples of a row follow each other; padding
fills the row to the batch's length. data/batch.py `sequence_length` counts
these tokens without building them.

Position ids (1D RoPE): frame j of a sample owns the slot [j*L, (j+1)*L) with
L = P + 2, for both of its copies: noisy `[marker jL][time jL+1][patches
jL+2..]`, clean `[<img> jL][patches jL+1..][</img> jL+P+1]`. So noisy clip k
sits right after the clean frames before it, exactly as when generating it
from a clean history.

Per-token metadata, what every attention backend consumes (attention.py has
the rule):
  sample_id  -1 for padding, else a row-unique sample number
  clip_id    clip index within its sample
  frame      frame index within the row (frames of later samples count on)
  is_noisy   whether the token belongs to a noisy clip
  role       rank of the token inside its frame: noisy 0 marker, 1 time,
             2 patch; clean 0 <img>, 1 patch, 2 </img>; padding 0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from jobconfig.errors import ConfigError

# token sources, in the order the model concatenates them (see VideoGPT.forward)
SRC_NOISY, SRC_CLEAN, SRC_TIME, SRC_MARKER, SRC_IMG_OPEN, SRC_IMG_CLOSE, SRC_PAD = range(7)
# roles of the tokens of one frame, in sequence order
NOISY_ROLES = (SRC_MARKER, SRC_TIME, SRC_NOISY)
CLEAN_ROLES = (SRC_IMG_OPEN, SRC_CLEAN, SRC_IMG_CLOSE)
ROLE_PATCH_NOISY, ROLE_PATCH_CLEAN = 2, 1


@dataclass(frozen=True)
class RowTokens:
    """Per-token tables of one row (python tuples, cached by the row's clip sizes)."""
    src: tuple[int, ...]        # SRC_*
    frame: tuple[int, ...]      # row frame index
    patch: tuple[int, ...]      # patch index within the frame (patch tokens), else 0
    position: tuple[int, ...]
    sample_id: tuple[int, ...]
    clip_id: tuple[int, ...]
    is_noisy: tuple[bool, ...]
    role: tuple[int, ...]


@lru_cache(maxsize=4096)
def _row_tokens(row: tuple[tuple[int, ...], ...], patches: int) -> RowTokens:
    cols: dict[str, list] = {name: [] for name in RowTokens.__dataclass_fields__}

    def add(src, frame, patch, pos, s, k, noisy, role):
        for name, value in zip(RowTokens.__dataclass_fields__, (src, frame, patch, pos, s, k, noisy, role)):
            cols[name].append(value)

    slot = patches + 2
    frame0 = 0
    for s, clips in enumerate(row):
        start = 0
        for k, size in enumerate(clips):
            frames = range(start, start + size)
            for j in frames:  # noisy copy: [marker][time][patches]
                add(SRC_MARKER, frame0 + j, 0, j * slot, s, k, True, 0)
                add(SRC_TIME, frame0 + j, 0, j * slot + 1, s, k, True, 1)
                for q in range(patches):
                    add(SRC_NOISY, frame0 + j, q, j * slot + 2 + q, s, k, True, ROLE_PATCH_NOISY)
            if k < len(clips) - 1:  # clean copy: [<img>][patches][</img>]; the last clip has none
                for j in frames:
                    add(SRC_IMG_OPEN, frame0 + j, 0, j * slot, s, k, False, 0)
                    for q in range(patches):
                        add(SRC_CLEAN, frame0 + j, q, j * slot + 1 + q, s, k, False, ROLE_PATCH_CLEAN)
                    add(SRC_IMG_CLOSE, frame0 + j, 0, j * slot + patches + 1, s, k, False, 2)
            start += size
        frame0 += start
    return RowTokens(**{name: tuple(values) for name, values in cols.items()})


@dataclass
class SequenceTables:
    """Batched token tables, padded to the longest row: all [B, L] long/bool tensors."""
    src: torch.Tensor
    frame: torch.Tensor
    patch: torch.Tensor
    position: torch.Tensor
    sample_id: torch.Tensor
    clip_id: torch.Tensor
    is_noisy: torch.Tensor
    role: torch.Tensor
    lengths: list[int]
    clips: tuple
    # the same tables on the host (numpy): what plans attention without reading the device back
    host: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.src.shape[1]


_PAD_FILL = {"src": SRC_PAD, "frame": 0, "patch": 0, "position": 0, "sample_id": -1, "clip_id": 0,
             "is_noisy": False, "role": 0}


def build_sequence(clips: list[list[list[int]]], patches: int, max_tokens: int, device=None) -> SequenceTables:
    """Token tables for a batch's clip sizes; refuses rows longer than `max_tokens`."""
    rows = [_row_tokens(tuple(tuple(c) for c in row), patches) for row in clips]
    lengths = [len(r.src) for r in rows]
    for r, n in enumerate(lengths):
        if n > max_tokens:
            raise ConfigError(f"clips row {r}: sequence of {n} tokens exceeds model.max_tokens={max_tokens}")
    L = max(lengths)
    out, host = {}, {}
    for name, fill in _PAD_FILL.items():
        data = [list(getattr(r, name)) + [fill] * (L - len(r.src)) for r in rows]
        host[name] = np.array(data, dtype=bool if name == "is_noisy" else np.int64)
        out[name] = torch.from_numpy(host[name]).to(device)
    return SequenceTables(**out, lengths=lengths, clips=tuple(tuple(tuple(c) for c in row) for row in clips),
                          host=host)
