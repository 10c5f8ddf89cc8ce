"""Honest MFU: the attention FLOPs count the (query, key) pairs the attention rule allows.

`allowed_attention_pairs` is a closed form over a row's clip sizes; it must
equal the allowed pairs of the dense reference mask (real tokens only) on
random layouts, and stay cheap at stage-4 size (80 frames of 222 tokens).
"""
from __future__ import annotations

import random
import time

import pytest

from jobconfig.loader import load_config
from pretrain.model.attention import ClipMeta
from pretrain.model.sequence import build_sequence
from pretrain.training.metrics import allowed_attention_pairs, train_flops


def dense_count(row, patches: int) -> int:
    seq = build_sequence([row], patches, max_tokens=10**6)
    mask = ClipMeta.of(seq).dense_mask()[0, 0]
    real = seq.sample_id[0] >= 0
    return int(mask[real][:, real].sum())


@pytest.mark.parametrize("seed", range(12))
def test_pairs_equal_the_dense_mask_on_random_layouts(seed):
    rng = random.Random(seed)
    patches = rng.choice([1, 2, 4, 6])
    row = [[rng.randint(1, 3) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))]
    assert allowed_attention_pairs(row, patches) == dense_count(row, patches), (row, patches)


def test_pairs_of_a_padded_batch_exclude_padding():
    rows, patches = [[[2, 1]], [[1], [1, 1, 1]]], 3
    seq = build_sequence(rows, patches, max_tokens=10**6)
    mask = ClipMeta.of(seq).dense_mask()[:, 0]
    real = seq.sample_id >= 0
    want = int((mask & real[:, :, None] & real[:, None, :]).sum())
    assert sum(allowed_attention_pairs(r, patches) for r in rows) == want


def test_stage4_row_is_fast_and_below_dense():
    row, patches = [[8] * 10], 220  # 80 frames, 222 tokens a frame copy
    t0 = time.perf_counter()
    pairs = allowed_attention_pairs(row, patches)
    assert time.perf_counter() - t0 < 0.01
    tokens = (80 + 72) * 222
    assert 0 < pairs < tokens * tokens / 2  # mostly causal: under half the dense square


def test_train_flops_counts_6n_plus_12_per_pair_per_hidden_unit():
    cfg = load_config(None, ["--model.preset=debug"]).model
    assert train_flops(cfg, 1000, 10, 0) == 6 * 1000 * 10
    assert train_flops(cfg, 0, 0, 5) == 12 * cfg.num_layers * cfg.hidden_size * 5
