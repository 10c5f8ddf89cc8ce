"""Clip attention: one op, three interchangeable backends, one rule.

The rule (METHOD.md, Attention rule; the reference's
`create_mask_frame_block_training`), within a sample:
  * clean stream, frame-causal: a clean token sees the clean frames before its
    own, and inside its own frame the tokens up to itself (<img> sees itself,
    the patches see <img> and the patches, </img> the whole frame);
  * noisy clip k sees every clean frame before clip k, and inside itself by
    role: markers see the clip's markers, time tokens the markers and time
    tokens, patches everything of the clip;
  * nobody sees another noisy clip, clean tokens never see noisy ones.
Samples packed into one row never see each other; padding sees only padding
(so no row is fully masked and no NaN appears). `attention_rule` states it
once, elementwise, for torch tensors and numpy arrays alike; every backend
derives its mask from it, and the KV-cached inference (sampler.py) follows it.

Backends, all taking the same per-token metadata (`ClipMeta`):
  flex       FlexAttention with a BlockMask built from the metadata (GPU,
             compiled; the forward also runs on CPU, there is no CPU backward).
  blockwise  exact, autograd everywhere (CPU/NPU training path). Keys are
             permuted per sample to [noisy clips K..1][clean frames 1..F'].
             Then every query group's keys are one contiguous slice: a clean
             patch's keys are a prefix of the clean region, a noisy clip's
             slice runs from itself into the clean region, the earlier noisy
             clips masked by a per-key vector that SDPA broadcasts over queries.
             The other tokens of a sample (markers, time tokens, delimiters: at
             most 4 per frame) form one group with a [specials, sample length]
             mask. Nothing L x L is ever built.
  dense      builds the full [B, 1, L, L] mask: a reference for tests at small L.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from jobconfig.errors import ConfigError


def attention_rule(sq, fq, cq, nq, rq, sk, fk, ck, nk, rk):
    """May a query (sample, frame, clip, noisy, role) attend to a key (the same five)?"""
    noisy_query = nq & ((nk & (ck == cq) & (rk <= rq)) | (~nk & (ck < cq)))
    clean_query = ~nq & ~nk & ((fk < fq) | ((fk == fq) & (rk <= rq)))
    return (sq == sk) & (noisy_query | clean_query)


@dataclass
class ClipMeta:
    """Per-token metadata, [B, L] each (see pretrain/model/sequence.py)."""
    sample_id: torch.Tensor
    frame: torch.Tensor
    clip_id: torch.Tensor
    is_noisy: torch.Tensor
    role: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    FIELDS = ("sample_id", "frame", "clip_id", "is_noisy", "role")

    @classmethod
    def of(cls, seq) -> "ClipMeta":
        """The metadata of a `SequenceTables` (or anything with the five fields)."""
        return cls(*(getattr(seq, name) for name in cls.FIELDS))

    @property
    def seq_len(self) -> int:
        return self.sample_id.shape[1]

    def columns(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.FIELDS]

    def dense_mask(self) -> torch.Tensor:
        """[B, 1, L, L] bool. Test/reference use only: quadratic memory."""
        cols = self.columns()
        return attention_rule(*(c[:, :, None] for c in cols), *(c[:, None, :] for c in cols))[:, None]


# ---------------------------------------------------------------- blockwise
@dataclass
class _Segment:
    q0: int
    q1: int
    k0: int
    k1: int
    # None: every key of the slice allowed; [k1-k0]: one key vector for all queries; [q1-q0, k1-k0]: per query
    mask: torch.Tensor | None


@dataclass
class _RowPlan:
    key_perm: torch.Tensor
    query_perm: torch.Tensor
    query_inv: torch.Tensor
    segments: list[_Segment]


def _plan_row(cols: list[np.ndarray], device) -> _RowPlan:
    sample, frame, clip, noisy, role = cols
    L = len(sample)
    big = np.iinfo(np.int64).max // 4
    sample_key = np.where(sample < 0, big, sample)
    # keys per sample: noisy clips in descending clip order, then the clean frames in sequence order
    key_perm = np.lexsort((np.arange(L), np.where(noisy, -clip - 1, 0), ~noisy, sample_key))
    kcols = [c[key_perm] for c in cols]
    # queries grouped by what they may see: the patches of a noisy clip, the patches of a clean frame,
    # and the few other tokens of a sample (markers, time tokens, delimiters: 4 per frame at most,
    # each seeing its own set) together in one group with a per-query mask
    special = (role != np.where(noisy, 2, 1)) & (sample >= 0)
    group = np.where(special, big, np.where(noisy, clip, frame))
    query_perm = np.lexsort((np.arange(L), group, special | ~noisy, sample_key))
    qcols = [c[query_perm] for c in cols]
    qs, qn, qsp, qg = qcols[0], qcols[3], special[query_perm], group[query_perm]
    change = np.ones(L, dtype=bool)
    change[1:] = (qs[1:] != qs[:-1]) | (qn[1:] != qn[:-1]) | (qsp[1:] != qsp[:-1]) | (qg[1:] != qg[:-1])
    starts = np.flatnonzero(change)
    segments = []
    for q0, q1 in zip(starts.tolist(), np.append(starts[1:], L).tolist()):
        if qsp[q0]:  # one row of the rule per query
            allowed = attention_rule(*(c[q0:q1, None] for c in qcols), *(c[None, :] for c in kcols))
            any_key = np.flatnonzero(allowed.any(0))
        else:
            allowed = attention_rule(*(c[q0] for c in qcols), *kcols)
            any_key = np.flatnonzero(allowed)
        k0, k1 = int(any_key[0]), int(any_key[-1]) + 1
        window = allowed[..., k0:k1]
        mask = None if window.all() else torch.from_numpy(np.ascontiguousarray(window)).to(device)
        segments.append(_Segment(q0, q1, k0, k1, mask))
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    query_inv = np.empty(L, dtype=np.int64)
    query_inv[query_perm] = np.arange(L)
    return _RowPlan(to(key_perm), to(query_perm), to(query_inv), segments)


def _blockwise_plans(meta: ClipMeta) -> list[_RowPlan]:
    plans = meta._cache.get("blockwise")
    if plans is None:
        cols = [c.cpu().numpy() for c in meta.columns()]
        plans = [_plan_row([c[b] for c in cols], meta.sample_id.device) for b in range(cols[0].shape[0])]
        meta._cache["blockwise"] = plans
    return plans


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: ClipMeta) -> torch.Tensor:
    """q, k, v: [B, H, L, D] -> [B, H, L, D], exact clip attention with autograd."""
    rows = []
    for b, plan in enumerate(_blockwise_plans(meta)):
        qb = q[b:b + 1].index_select(2, plan.query_perm)
        kb = k[b:b + 1].index_select(2, plan.key_perm)
        vb = v[b:b + 1].index_select(2, plan.key_perm)
        pieces = []
        for seg in plan.segments:
            mask = seg.mask
            if mask is not None:
                mask = mask.view(1, 1, *([1] if mask.ndim == 1 else []), *mask.shape)
            pieces.append(F.scaled_dot_product_attention(
                qb[:, :, seg.q0:seg.q1], kb[:, :, seg.k0:seg.k1], vb[:, :, seg.k0:seg.k1], attn_mask=mask))
        rows.append(torch.cat(pieces, dim=2).index_select(2, plan.query_inv))
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
        cols = meta.columns()

        def mask_mod(b, h, q_idx, kv_idx):
            return attention_rule(*(c[b, q_idx] for c in cols), *(c[b, kv_idx] for c in cols))

        B, L = meta.sample_id.shape
        meta._cache[key] = create_block_mask(mask_mod, B, None, L, L, device=meta.sample_id.device,
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
