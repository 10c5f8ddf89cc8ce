"""The attention rule (issue 14: frame-causal clean stream, roles inside a frame and a noisy
clip) as every backend implements it, and backend parity in forward and gradients."""
from __future__ import annotations

import random

import pytest
import torch

from pretrain.model.attention import ClipMeta, blockwise_attention, dense_attention, flex_attention
from pretrain.model.sequence import build_sequence

PATCHES = 2


def brute_force_tokens(row):
    """(sample, clip, noisy, frame, role) per token, walking METHOD.md's layout by hand."""
    tokens = []
    for s, clips in enumerate(row):
        first = 0
        for k, size in enumerate(clips):
            for f in range(first, first + size):  # noisy: marker, time, patches
                tokens += [(s, k, True, f, 0), (s, k, True, f, 1)] + [(s, k, True, f, 2)] * PATCHES
            if k < len(clips) - 1:
                for f in range(first, first + size):  # clean: <img>, patches, </img>
                    tokens += [(s, k, False, f, 0)] + [(s, k, False, f, 1)] * PATCHES + [(s, k, False, f, 2)]
            first += size
    return tokens


def brute_force_mask(row, length):
    """The rule, written as plain if-statements over token descriptors; padding sees padding."""
    toks = brute_force_tokens(row)
    toks += [None] * (length - len(toks))
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i, q in enumerate(toks):
        for j, k in enumerate(toks):
            if q is None or k is None:
                mask[i, j] = q is None and k is None
                continue
            (sq, cq, nq, fq, rq), (sk, ck, nk, fk, rk) = q, k
            if sq != sk:
                mask[i, j] = False
            elif nq:  # noisy query: clean frames of earlier clips; its own clip by role
                mask[i, j] = (nk and ck == cq and rk <= rq) or (not nk and ck < cq)
            else:  # clean query: earlier clean frames; its own frame up to its role
                mask[i, j] = (not nk) and (fk < fq or (fk == fq and rk <= rq))
    return mask


def implemented_mask(backend, meta: ClipMeta) -> torch.Tensor:
    """Read back the mask a backend really applies: uniform scores, one-hot values."""
    B, L = meta.sample_id.shape
    q = torch.zeros(B, 1, L, L)
    k = torch.randn(B, 1, L, L)
    v = torch.eye(L).expand(B, 1, L, L).contiguous()
    return backend(q, k, v, meta)[:, 0] > 0


def any_clip_sizes(frames, rng):
    """Any partition of `frames`, one clip included (wider than the stages' sampler, data/stage.py)."""
    k = rng.randint(1, frames)
    cuts = sorted(rng.sample(range(1, frames), k - 1))
    b = [0, *cuts, frames]
    return [y - x for x, y in zip(b, b[1:])]


def layouts():
    rng = random.Random(0)
    cases = [
        [[[1, 1, 1, 1]]],          # all clips of size 1 (stage 1)
        [[[5]]],                   # a single clip: no clean copy at all
        [[[3, 1, 2]], [[2, 2]]],   # uneven sizes; second row padded
        [[[2, 1], [1, 1, 1]]],     # two packed samples in one row
    ]
    for _ in range(4):
        cases.append([[any_clip_sizes(rng.randint(2, 6), rng) for _ in range(rng.randint(1, 2))]
                      for _ in range(2)])
    return cases


BACKENDS = {"blockwise": blockwise_attention, "dense": dense_attention, "flex": flex_attention}


@pytest.mark.parametrize("layout", layouts(), ids=lambda l: str(l).replace(" ", ""))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_implements_the_rule(layout, backend):
    seq = build_sequence(layout, PATCHES, max_tokens=10_000)
    for b, row in enumerate(layout):
        walked = brute_force_tokens(row)
        frame0 = [sum(sum(c) for c in row[:i]) for i in range(len(row))]  # tables count frames per row
        got = [(s, c, n, f - frame0[s], r) for s, c, n, f, r in zip(*(getattr(seq, name)[b].tolist() for name in
               ("sample_id", "clip_id", "is_noisy", "frame", "role")))]
        assert got[:len(walked)] == walked, "sequence construction differs from METHOD.md's layout"
    meta = ClipMeta.of(seq)
    mask = implemented_mask(BACKENDS[backend], meta)
    for b, row in enumerate(layout):
        expected = brute_force_mask(row, seq.seq_len)
        bad = (mask[b] != expected).nonzero()
        assert len(bad) == 0, f"{backend}: {len(bad)} token pairs differ from the rule, first {bad[0].tolist()}"


@pytest.mark.parametrize("seed", range(5))
def test_blockwise_matches_dense_forward_and_gradients(seed):
    rng = random.Random(seed)
    layout = [[any_clip_sizes(rng.randint(2, 7), rng) for _ in range(rng.randint(1, 3))] for _ in range(2)]
    seq = build_sequence(layout, 4, max_tokens=10_000)
    meta = ClipMeta.of(seq)
    B, L = seq.src.shape
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, 3, L, 16, requires_grad=True) for _ in range(3))
    w = torch.randn(B, 3, L, 16)
    out_b = blockwise_attention(q, k, v, meta)
    grads_b = torch.autograd.grad((out_b * w).sum(), (q, k, v))
    out_d = dense_attention(q, k, v, meta)
    grads_d = torch.autograd.grad((out_d * w).sum(), (q, k, v))
    torch.testing.assert_close(out_b, out_d, rtol=1e-5, atol=1e-5)
    for name, gb, gd in zip("qkv", grads_b, grads_d):
        torch.testing.assert_close(gb, gd, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_flex_forward_matches_dense_on_cpu():
    layout = [[[2, 1, 3]], [[1, 1], [2]]]
    seq = build_sequence(layout, 4, max_tokens=10_000)
    meta = ClipMeta.of(seq)
    B, L = seq.src.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 2, L, 16) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, meta, compile=False), dense_attention(q, k, v, meta),
                               rtol=1e-5, atol=1e-5)


def test_dense_refuses_long_sequences():
    seq = build_sequence([[[4, 4]]], 220, max_tokens=100_000)
    meta = ClipMeta.of(seq)
    q = torch.zeros(1, 1, seq.seq_len, 8)
    with pytest.raises(ValueError, match="dense_max_tokens"):
        dense_attention(q, q, q, meta, max_tokens=1000)
