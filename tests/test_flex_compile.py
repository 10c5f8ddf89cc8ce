"""Compiled FlexAttention across a stage: a bounded number of compiles, whatever the layouts.

From stage 2 on the clip partition, hence the sequence length, changes nearly
every step. A graph per length would recompile every step and, past dynamo's
recompile limit, fall back to the unfused kernel (pretrain/model/attention.py,
flex backend). Here: random stage-2/3-like layouts of at least 12 different
lengths compile at most twice (one create_block_mask graph, one flex graph),
never warn about the unfused fallback, and match the block-wise backend; a
repeated layout reuses its cached BlockMask.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.attention.flex_attention as torch_flex
from torch._dynamo.utils import counters

from data.stage import random_partition
from pretrain.model import attention
from pretrain.model.attention import ClipMeta, blockwise_attention, clear_flex_cache, flex_attention
from pretrain.model.sequence import build_sequence

UNFUSED = "unfused implementation"


def stage_layouts(count: int, seed: int = 0):
    """`count` (clips, patches) batches of distinct lengths: 1 and 2 rows in turn, one row first (its
    folded q/k/v differ most from a 2-row batch's), each row a 6-12 frame sample cut by the stages'
    random partition, sometimes two samples packed in a row."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        patches = rng.randint(4, 16)
        rows = [[list(random_partition(rng.randint(6, 12), rng)) for _ in range(rng.choice([1, 1, 2]))]
                for _ in range(1 + len(out) % 2)]
        length = build_sequence(rows, patches, max_tokens=100_000).seq_len
        if length not in seen:
            seen.add(length)
            out.append((rows, patches))
    return out


@pytest.mark.slow  # compiles FlexAttention
def test_compiled_flex_compiles_at_most_twice_over_a_stage():
    torch._dynamo.reset()
    counters.clear()
    clear_flex_cache()
    # torch warns about the unfused fallback once per process: forget an earlier test's warning
    getattr(torch_flex, "_WARNINGS_SHOWN", set()).discard("flex_attention_performance")
    layouts = stage_layouts(14)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (rows, patches) in enumerate(layouts):
            seq = build_sequence(rows, patches, max_tokens=100_000)
            meta = ClipMeta.of(seq)
            B, L = seq.src.shape
            torch.manual_seed(i)
            q, k, v = (torch.randn(B, 2, L, 16) for _ in range(3))
            got = flex_attention(q, k, v, meta, compile=True)
            # every output, the rows' own padding included, as the block-wise backend gives it
            torch.testing.assert_close(got, blockwise_attention(q, k, v, meta), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, where=f"layout {rows} x {patches} patches": f"{where}: {m}")
    unfused = [str(w.message) for w in caught if UNFUSED in str(w.message)]
    assert not unfused, f"compiled flex fell back to the unfused kernel: {unfused[0][:120]}"
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs compiled over {len(layouts)} layouts (dynamo frames: " \
                             f"{dict(counters['frames'])})"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_repeated_layout_reuses_the_cached_block_mask(monkeypatch):
    clear_flex_cache()
    builds = []
    build = attention._build_block_mask
    monkeypatch.setattr(attention, "_build_block_mask", lambda *a, **k: builds.append(a[1]) or build(*a, **k))

    def run(rows, patches=4):
        seq = build_sequence(rows, patches, max_tokens=10_000)
        meta = ClipMeta.of(seq)  # a new ClipMeta every batch, as VideoGPT.forward makes it
        q = torch.randn(seq.src.shape[0], 2, seq.seq_len, 8)
        for _ in range(2):  # two layers: one BlockMask per batch
            flex_attention(q, q, q, meta, compile=False)
        return attention.flex_block_mask(meta)

    first = run([[[2, 3, 1]], [[4, 2]]])
    assert len(builds) == 1
    assert run([[[2, 3, 1]], [[4, 2]]]) is first, "a repeated layout built a new BlockMask"
    assert len(builds) == 1
    run([[[3, 3]]])  # a new layout, then the first one again: still cached
    assert run([[[2, 3, 1]], [[4, 2]]]) is first and len(builds) == 2
    run([[[2, 3, 1]], [[4, 2]]], patches=5)  # same clips, other patches per frame: another layout
    assert len(builds) == 3

    # metadata without a layout key (built by hand) is never shared between batches
    seq = build_sequence([[[2, 3, 1]], [[4, 2]]], 4, max_tokens=10_000)
    anonymous = ClipMeta(*ClipMeta.of(seq).columns())
    assert anonymous.key is None and attention.flex_block_mask(anonymous) is not first
    assert len(builds) == 4


def test_the_mask_cache_is_bounded(monkeypatch):
    clear_flex_cache()
    monkeypatch.setattr(attention, "FLEX_MASK_CACHE_SIZE", 3)
    for frames in range(2, 8):
        attention.flex_block_mask(ClipMeta.of(build_sequence([[[1] * frames]], 2, max_tokens=10_000)))
    assert len(attention._flex_masks) == 3
