"""The token sequence of a batch: how a row of clips becomes the model's tokens.

A row (`Batch.clips` of one row: packed samples, each a list of clip sizes)
becomes, per sample,

    [noisy c1][clean c1][noisy c2][clean c2] ... [noisy cK]

where each noisy frame is [diffusion marker][time token][patches] and each
clean frame is [patches]. Samples of a row follow each other; padding fills
the row to the batch's length. data/batch.py `sequence_length` counts these
tokens without building them.

Position ids are laid out *as at inference time*: frame slot j of a sample
occupies positions [j*S, (j+1)*S) with S = 2 + patches, the noisy copy of a
frame uses the whole slot and the clean copy the same slot minus the two
special positions. So noisy clip k sits right after clean clips 1..k-1 in
RoPE space, exactly as when generating clip k from a clean history.

Clip metadata per token (what every attention backend consumes):
  sample_id  -1 for padding, else a row-unique sample number
  clip_id    clip index within its sample
  is_noisy   whether the token belongs to a noisy clip
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from jobconfig.errors import ConfigError

# token sources, in the order the model concatenates them (see VideoGPT._assemble)
SRC_NOISY, SRC_CLEAN, SRC_TIME, SRC_MARKER, SRC_PAD = range(5)


@dataclass(frozen=True)
class RowTokens:
    """Per-token tables of one row (python tuples, cached by the row's clip sizes)."""
    src: tuple[int, ...]        # SRC_*
    frame: tuple[int, ...]      # row frame index (patch/time tokens), else 0
    patch: tuple[int, ...]      # patch index within frame, else 0
    position: tuple[int, ...]
    sample_id: tuple[int, ...]
    clip_id: tuple[int, ...]
    is_noisy: tuple[bool, ...]


@lru_cache(maxsize=4096)
def _row_tokens(row: tuple[tuple[int, ...], ...], patches: int) -> RowTokens:
    src, frame, patch, pos, sid, cid, noisy = [], [], [], [], [], [], []
    slot = patches + 2
    frame0 = 0
    for s, clips in enumerate(row):
        starts = [sum(clips[:k]) for k in range(len(clips))]
        for k, (start, size) in enumerate(zip(starts, clips)):
            last = k == len(clips) - 1
            for copy_noisy in ((True,) if last else (True, False)):
                for j in range(start, start + size):
                    base = j * slot
                    if copy_noisy:
                        for kind, p in ((SRC_MARKER, base), (SRC_TIME, base + 1)):
                            src.append(kind); frame.append(frame0 + j); patch.append(0); pos.append(p)
                            sid.append(s); cid.append(k); noisy.append(True)
                    for q in range(patches):
                        src.append(SRC_NOISY if copy_noisy else SRC_CLEAN)
                        frame.append(frame0 + j); patch.append(q); pos.append(base + 2 + q)
                        sid.append(s); cid.append(k); noisy.append(copy_noisy)
        frame0 += sum(clips)
    return RowTokens(*(tuple(x) for x in (src, frame, patch, pos, sid, cid, noisy)))


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
    lengths: list[int]
    clips: tuple

    @property
    def seq_len(self) -> int:
        return self.src.shape[1]


def build_sequence(clips: list[list[list[int]]], patches: int, max_tokens: int, device=None) -> SequenceTables:
    """Token tables for a batch's clip sizes; refuses rows longer than `max_tokens`."""
    rows = [_row_tokens(tuple(tuple(c) for c in row), patches) for row in clips]
    lengths = [len(r.src) for r in rows]
    for r, n in enumerate(lengths):
        if n > max_tokens:
            raise ConfigError(f"clips row {r}: sequence of {n} tokens exceeds model.max_tokens={max_tokens}")
    L = max(lengths)
    fills = {"src": SRC_PAD, "frame": 0, "patch": 0, "position": 0, "sample_id": -1, "clip_id": 0, "is_noisy": False}
    out = {}
    for name, fill in fills.items():
        data = [list(getattr(r, name)) + [fill] * (L - len(r.src)) for r in rows]
        out[name] = torch.tensor(data, dtype=torch.bool if name == "is_noisy" else torch.long, device=device)
    return SequenceTables(**out, lengths=lengths, clips=tuple(tuple(tuple(c) for c in row) for row in clips))
