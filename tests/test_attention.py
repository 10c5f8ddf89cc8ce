"""Acceptance 1-2 of the foundation: the clip attention rule and backend parity."""
from __future__ import annotations

import random

import pytest
import torch

from pretrain.model.attention import ClipMeta, blockwise_attention, dense_attention, flex_attention
from pretrain.model.sequence import build_sequence

PATCHES = 2


def brute_force_tokens(row):
    """(sample, clip, noisy) per token, walking METHOD.md's layout by hand."""
    tokens = []
    for s, clips in enumerate(row):
        for k, size in enumerate(clips):
            tokens += [(s, k, True)] * (size * (PATCHES + 2))
            if k < len(clips) - 1:
                tokens += [(s, k, False)] * (size * PATCHES)
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
            elif q[0] != k[0]:
                mask[i, j] = False
            elif q[2]:  # noisy query: earlier clean clips, and its own noisy clip
                mask[i, j] = (k[2] and k[1] == q[1]) or (not k[2] and k[1] < q[1])
            else:  # clean query: clean clips up to its own
                mask[i, j] = (not k[2]) and k[1] <= q[1]
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
        got = list(zip(seq.sample_id[b].tolist(), seq.clip_id[b].tolist(), seq.is_noisy[b].tolist()))
        assert got[:len(walked)] == walked, "sequence construction differs from METHOD.md's layout"
    meta = ClipMeta(seq.sample_id, seq.clip_id, seq.is_noisy)
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
    meta = ClipMeta(seq.sample_id, seq.clip_id, seq.is_noisy)
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
    meta = ClipMeta(seq.sample_id, seq.clip_id, seq.is_noisy)
    B, L = seq.src.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 2, L, 16) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, meta, compile=False), dense_attention(q, k, v, meta),
                               rtol=1e-5, atol=1e-5)


def test_dense_refuses_long_sequences():
    seq = build_sequence([[[4, 4]]], 220, max_tokens=100_000)
    meta = ClipMeta(seq.sample_id, seq.clip_id, seq.is_noisy)
    q = torch.zeros(1, 1, seq.seq_len, 8)
    with pytest.raises(ValueError, match="dense_max_tokens"):
        dense_attention(q, q, q, meta, max_tokens=1000)
