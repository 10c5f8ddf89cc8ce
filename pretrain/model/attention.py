"""Clip attention: one op, three interchangeable backends, one rule.

The rule (METHOD.md): within a sample, a noisy clip sees the clean clips
before it and itself; a clean clip sees the clean clips up to itself; nobody
sees another noisy clip; samples packed into one row never see each other;
padding sees only padding (so no row is fully masked and no NaN appears).
`clip_rule` states it once, elementwise, for torch tensors and numpy arrays
alike; every backend derives its mask from it.

Backends, all taking the same per-token metadata (`ClipMeta`):
  flex       FlexAttention with a BlockMask built from the metadata (GPU,
             compiled; the forward also runs on CPU, there is no CPU backward).
  blockwise  exact, autograd everywhere (CPU/NPU training path). Per row the
             tokens are permuted to [noisy clips K..1][clean clips 1..K-1] per
             sample. Then every query group's keys are one contiguous slice:
             a clean clip's keys are exactly a prefix of the clean region, and a
             noisy clip's slice runs from itself into the clean region, the
             earlier noisy clips in between masked by a per-key vector that
             SDPA broadcasts over queries. Nothing L x L is ever built, and the
             work is about 3/8 L^2 against the dense path's L^2.
  dense      builds the full [B, 1, L, L] mask: a reference for tests at small L.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from jobconfig.errors import ConfigError


def clip_rule(sq, cq, nq, sk, ck, nk):
    """May a query (sample sq, clip cq, noisy nq) attend to a key (sk, ck, nk)?"""
    same = sq == sk
    return same & ((nq & nk & (cq == ck)) | (nq & ~nk & (ck < cq)) | (~nq & ~nk & (ck <= cq)))


@dataclass
class ClipMeta:
    """Per-token clip metadata, [B, L] each (see pretrain/model/sequence.py)."""
    sample_id: torch.Tensor
    clip_id: torch.Tensor
    is_noisy: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.sample_id.shape[1]

    def dense_mask(self) -> torch.Tensor:
        """[B, 1, L, L] bool. Test/reference use only: quadratic memory."""
        s, c, n = self.sample_id, self.clip_id, self.is_noisy
        return clip_rule(s[:, :, None], c[:, :, None], n[:, :, None], s[:, None, :], c[:, None, :], n[:, None, :])[:, None]


# ---------------------------------------------------------------- blockwise
@dataclass
class _Segment:
    q0: int
    q1: int
    k0: int
    k1: int
    key_mask: torch.Tensor | None  # [k1-k0] bool, None when every key of the slice is allowed


@dataclass
class _RowPlan:
    perm: torch.Tensor
    inv_perm: torch.Tensor
    segments: list[_Segment]


def _plan_row(sample_id: np.ndarray, clip_id: np.ndarray, is_noisy: np.ndarray, device) -> _RowPlan:
    L = len(sample_id)
    big = np.iinfo(np.int64).max // 4
    sample_key = np.where(sample_id < 0, big, sample_id)
    # per sample: noisy clips in descending clip order, then clean clips ascending
    order_key = np.where(is_noisy, -clip_id - 1, clip_id)
    perm = np.lexsort((np.arange(L), order_key, ~is_noisy, sample_key))
    s, c, n = sample_id[perm], clip_id[perm], is_noisy[perm]
    # query groups: maximal runs of equal (sample, clip, noisy)
    change = np.ones(L, dtype=bool)
    change[1:] = (s[1:] != s[:-1]) | (c[1:] != c[:-1]) | (n[1:] != n[:-1])
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], L)
    segments = []
    for q0, q1 in zip(starts.tolist(), ends.tolist()):
        allowed = clip_rule(s[q0], c[q0], n[q0], s, c, n)
        idx = np.flatnonzero(allowed)
        k0, k1 = int(idx[0]), int(idx[-1]) + 1
        window = allowed[k0:k1]
        mask = None if window.all() else torch.from_numpy(window.copy()).to(device)
        segments.append(_Segment(q0, q1, k0, k1, mask))
    perm_t = torch.from_numpy(perm).to(device)
    inv = torch.empty_like(perm_t)
    inv[perm_t] = torch.arange(L, device=device)
    return _RowPlan(perm_t, inv, segments)


def _blockwise_plans(meta: ClipMeta) -> list[_RowPlan]:
    plans = meta._cache.get("blockwise")
    if plans is None:
        s = meta.sample_id.cpu().numpy()
        c = meta.clip_id.cpu().numpy()
        n = meta.is_noisy.cpu().numpy()
        plans = [_plan_row(s[b], c[b], n[b], meta.sample_id.device) for b in range(s.shape[0])]
        meta._cache["blockwise"] = plans
    return plans


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: ClipMeta) -> torch.Tensor:
    """q, k, v: [B, H, L, D] -> [B, H, L, D], exact clip attention with autograd."""
    rows = []
    for b, plan in enumerate(_blockwise_plans(meta)):
        qb = q[b:b + 1].index_select(2, plan.perm)
        kb = k[b:b + 1].index_select(2, plan.perm)
        vb = v[b:b + 1].index_select(2, plan.perm)
        pieces = []
        for seg in plan.segments:
            mask = None if seg.key_mask is None else seg.key_mask.view(1, 1, 1, -1)
            pieces.append(F.scaled_dot_product_attention(
                qb[:, :, seg.q0:seg.q1], kb[:, :, seg.k0:seg.k1], vb[:, :, seg.k0:seg.k1], attn_mask=mask))
        rows.append(torch.cat(pieces, dim=2).index_select(2, plan.inv_perm))
    return torch.cat(rows, dim=0)


# ---------------------------------------------------------------- dense / flex
def dense_attention(q, k, v, meta: ClipMeta, max_tokens: int = 8192) -> torch.Tensor:
    if meta.seq_len > max_tokens:
        raise ConfigError(f"attention 'dense': sequence of {meta.seq_len} tokens exceeds "
                          f"model.dense_max_tokens={max_tokens}; it is a test reference, use 'blockwise' or 'flex'")
    mask = meta._cache.get("dense")
    if mask is None:
        mask = meta._cache["dense"] = meta.dense_mask()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_compiled_flex = None


def flex_block_mask(meta: ClipMeta, compile: bool = False, block_size: int = 128):
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex_mask", compile, block_size)
    if key not in meta._cache:
        s, c, n = meta.sample_id, meta.clip_id, meta.is_noisy

        def mask_mod(b, h, q_idx, kv_idx):
            return clip_rule(s[b, q_idx], c[b, q_idx], n[b, q_idx], s[b, kv_idx], c[b, kv_idx], n[b, kv_idx])

        B, L = s.shape
        meta._cache[key] = create_block_mask(mask_mod, B, None, L, L, device=s.device,
                                             BLOCK_SIZE=block_size, _compile=compile)
    return meta._cache[key]


def flex_attention(q, k, v, meta: ClipMeta, compile: bool | None = None) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if compile is None:
        compile = q.device.type == "cuda"
    block_mask = flex_block_mask(meta, compile=compile)
    if compile:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return _flex(q, k, v, block_mask=block_mask)


# ---------------------------------------------------------------- selection
def resolve_backend(name: str, device: torch.device | str) -> str:
    """`auto`: FlexAttention where it has a backward (CUDA), the exact block-wise path elsewhere."""
    if name != "auto":
        return name
    return "flex" if torch.device(device).type == "cuda" else "blockwise"


def make_attention(meta: ClipMeta, backend: str, device, dense_max_tokens: int = 8192) -> Callable:
    """An `attn(q, k, v)` closure bound to one batch's clip metadata."""
    backend = resolve_backend(backend, device)
    if backend == "blockwise":
        return lambda q, k, v: blockwise_attention(q, k, v, meta)
    if backend == "dense":
        return lambda q, k, v: dense_attention(q, k, v, meta, dense_max_tokens)
    if backend == "flex":
        return lambda q, k, v: flex_attention(q, k, v, meta)
    raise ConfigError(f"model.attention: got {backend!r}, expected one of ['auto', 'flex', 'blockwise', 'dense']")
