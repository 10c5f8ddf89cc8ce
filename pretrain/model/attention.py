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
             From stage 2 on the clip partition, hence L, changes nearly every
             step; a graph per L would recompile every step and, past dynamo's
             recompile limit, fall back to the unfused kernel that builds the
             L x L scores. So the rows are folded into one sequence of
             B * Lp tokens (Lp: L padded to the block size, two blocks at
             least) and compiled once with dynamic shapes: batch 1 always and
             one symbolic length, whatever the layout. Tail padding is its own
             sample (real tokens never see it) and is cut off the output; rows
             get disjoint sample ids, so the block-sparse kernel skips every
             cross-row block. BlockMasks come from a compiled create_block_mask
             (also one dynamic graph) and are cached per layout (`ClipMeta.key`).
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

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex

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
    # hashable python description of the layout (same key, same metadata), or None: lets the flex
    # backend reuse a BlockMask across batches without reading the tensors back from the device
    key: tuple | None = None
    # the five columns as numpy arrays when the caller has them on the host (SequenceTables.host):
    # the block-wise plan is built from them, so no step reads the device back
    host: list | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    FIELDS = ("sample_id", "frame", "clip_id", "is_noisy", "role")

    @classmethod
    def of(cls, seq) -> "ClipMeta":
        """The metadata of a `SequenceTables` (or anything with the five fields).

        A `SequenceTables` is keyed by its clip sizes, row lengths and padded length: together they
        fix every table (patches per frame is the one unknown, and L grows strictly with it)."""
        key = None
        if getattr(seq, "clips", None) is not None and getattr(seq, "lengths", None) is not None:
            key = ("clips", seq.clips, tuple(seq.lengths), seq.sample_id.shape[1])
        host = getattr(seq, "host", None)
        host = [host[name] for name in cls.FIELDS] if host else None
        return cls(*(getattr(seq, name) for name in cls.FIELDS), key=key, host=host)

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


def cached_by_layout(meta: ClipMeta, local_key, tail: tuple, cache: OrderedDict, size: int, build: Callable):
    """What `build()` makes of `meta`: from the meta itself (every layer of a step), else from `cache`, an
    LRU over batches keyed by (ClipMeta.key, device, *tail), else built and kept. Metadata without a
    key is cached on the meta only."""
    if local_key in meta._cache:
        return meta._cache[local_key]
    shared = None if meta.key is None else (meta.key, str(meta.sample_id.device), *tail)
    value = cache.get(shared) if shared is not None else None
    if value is None:
        value = build()
        if shared is not None:
            cache[shared] = value
            while len(cache) > size:
                cache.popitem(last=False)
    else:
        cache.move_to_end(shared)
    meta._cache[local_key] = value
    return value


# plans of recent layouts (stage 1 repeats one layout every step)
BLOCKWISE_PLAN_CACHE_SIZE = 64
_blockwise_plans_cache: OrderedDict = OrderedDict()


def _blockwise_plans(meta: ClipMeta) -> list[_RowPlan]:
    def build():
        cols = meta.host if meta.host is not None else [c.cpu().numpy() for c in meta.columns()]
        return [_plan_row([c[b] for c in cols], meta.sample_id.device) for b in range(cols[0].shape[0])]

    return cached_by_layout(meta, "blockwise", (), _blockwise_plans_cache, BLOCKWISE_PLAN_CACHE_SIZE, build)


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


FLEX_BLOCK = 128           # FlexAttention's sparse block: the padding unit of the folded sequence
FLEX_MASK_CACHE_SIZE = 32  # BlockMasks kept across batches (an entry is a few MB at stage-2 lengths)

_flex_masks: OrderedDict = OrderedDict()  # (ClipMeta.key, device, block, compile) -> _FlexLayout, LRU
_compiled: dict = {}


def _compiled_fn(name: str):
    """torch.compile'd flex_attention / create_block_mask, one each per process.

    dynamic=True: the folded length is symbolic from the first call, so one graph serves every
    layout of a stage (with dynamic=None the first graph would be static and a second one follow)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(_flex if name == "flex" else create_block_mask, dynamic=True)
    return _compiled[name]


@dataclass
class _FlexLayout:
    """A batch's metadata folded into one padded sequence, and its BlockMask."""
    rows: int            # B
    length: int          # L, the batch's sequence length
    padded: int          # Lp: L padded to the block size; the folded sequence has rows * Lp tokens
    block_mask: object   # BlockMask over [1, 1, rows * Lp, rows * Lp]


def _padded_length(rows: int, length: int, block: int) -> int:
    # two blocks in all at least: dynamo specialises a size of 1, and a one-block sequence would
    # compile a second graph
    return max(-(-length // block), 2 if rows == 1 else 1) * block


def _folded_columns(meta: ClipMeta, padded: int) -> list[torch.Tensor]:
    """The five columns as [B * Lp] tensors: rows one after the other, each padded to Lp.

    Sample ids are made unique across rows (s + r*L), a row's own padding becomes sample -1-r
    (it sees its row's padding, as in the other backends) and the tail padding up to Lp sample
    -1-B-r (it sees itself only, and no real token sees it). All on the device, no host sync."""
    B, L = meta.sample_id.shape
    device = meta.sample_id.device
    row = torch.arange(B, device=device)[:, None]
    tail = torch.arange(padded, device=device)[None, :] >= L
    cols = [F.pad(c, (0, padded - L)) for c in meta.columns()]
    sample = cols[0]
    cols[0] = torch.where(tail, -1 - B - row, torch.where(sample >= 0, sample + row * L, -1 - row))
    # fresh tensors, not views: dynamo would guard on a view's base, whose [B, Lp] shape varies
    return [c.reshape(-1).clone() for c in cols]


def _build_block_mask(mask_mod, tokens: int, device, block: int, compile: bool):
    """create_block_mask over the folded sequence (a seam for tests to count the builds)."""
    build = _compiled_fn("block_mask") if compile else create_block_mask
    return build(mask_mod, 1, None, tokens, tokens, device, block)


def _flex_layout(meta: ClipMeta, compile: bool, block: int) -> _FlexLayout:
    """The folded layout of `meta` and its BlockMask, cached by layout (`cached_by_layout`)."""
    def build():
        B, L = meta.sample_id.shape
        padded = _padded_length(B, L, block)
        cols = _folded_columns(meta, padded)

        def mask_mod(b, h, q_idx, kv_idx):
            return attention_rule(*(c[q_idx] for c in cols), *(c[kv_idx] for c in cols))

        return _FlexLayout(B, L, padded, _build_block_mask(mask_mod, B * padded, meta.sample_id.device, block,
                                                           compile))

    return cached_by_layout(meta, ("flex_layout", compile, block), (block, compile), _flex_masks,
                            FLEX_MASK_CACHE_SIZE, build)


def clear_flex_cache() -> None:
    """Forget the cached BlockMasks (tests; or to free them between stages)."""
    _flex_masks.clear()


def flex_block_mask(meta: ClipMeta, compile: bool = False, block_size: int = FLEX_BLOCK):
    """The BlockMask flex_attention applies: over the B rows folded into one padded sequence."""
    return _flex_layout(meta, compile, block_size).block_mask


def flex_attention(q, k, v, meta: ClipMeta, compile: bool | None = None) -> torch.Tensor:
    """q, k, v: [B, H, L, D] -> [B, H, L, D]; compiled by default on CUDA (one graph for all L)."""
    if compile is None:
        compile = q.device.type == "cuda"
    layout = _flex_layout(meta, compile, FLEX_BLOCK)
    B, _, L, _ = q.shape
    if (B, L) != (layout.rows, layout.length):
        raise ValueError(f"flex_attention: q is [B={B}, L={L}], the clip metadata [{layout.rows}, {layout.length}]")
    Lp = layout.padded

    def fold(x):  # [B, H, L, D] -> [1, H, B*Lp, D]
        # always a fresh tensor (pad and cat copy): dynamo guards on a view's base, so a view for
        # some batches and not for others would compile a second graph
        x = F.pad(x, (0, 0, 0, Lp - L))
        return x if B == 1 else torch.cat(x.split(1), dim=2)

    out = (_compiled_fn("flex") if compile else _flex)(fold(q), fold(k), fold(v), block_mask=layout.block_mask)
    return out.reshape(out.shape[1], B, Lp, out.shape[-1]).transpose(0, 1)[:, :, :L]


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
