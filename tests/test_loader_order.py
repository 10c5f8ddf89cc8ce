"""The global order and the step schedule, on metadata alone (data/order.py).

Fast property tests over many shapes: the epoch order is a permutation, every
position of a step goes to exactly one (rank, worker) reader, and resuming a
schedule on another world size continues with exactly the positions an
uninterrupted run would serve. The loader tests check the same on real shards.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.order import Schedule, epoch_order, reader_items, resolve_num_streams
from jobconfig.errors import ConfigError


def served(schedule: Schedule, steps: int, workers: int) -> tuple[list[list[tuple[int, int]]], list[set[int]]]:
    """Per global step: the (bucket, bucket-stream index) of its items in slot order, assembled from
    every reader, and the known skips it reports; checks that no two readers claim an item."""
    W, n = schedule.world_size, max(1, workers)
    items = [[] for _ in range(steps)]
    skips = [set() for _ in range(steps)]
    for r in range(W):
        for w in range(n):
            for win in schedule.windows():
                if win.first_step >= steps:
                    break
                st_, bk, it, sk = reader_items(win, schedule.batch, W, r, w, workers)
                for s, b, i in zip(st_.tolist(), bk.tolist(), it.tolist()):
                    if s < steps:
                        items[s].append((b, i))
                for s, k in zip(sk[0].tolist(), sk[1].tolist()):
                    if s < steps:
                        assert k not in skips[s], "two readers report the same skip"
                        skips[s].add(k)
    for s in range(steps):
        assert len(set(items[s])) == len(items[s]), "two readers claim the same item"
        items[s].sort()
    return items, skips


def cursors_after(schedule: Schedule, steps: int) -> tuple[tuple[int, ...], int]:
    """Cursors and known skips reported after `steps` global steps, moved step by step as the loader
    moves its state (Schedule.advance)."""
    cur, reported = schedule.start, schedule.skips_start
    for win in schedule.windows():
        for t in range(len(win)):
            if win.first_step + t >= steps:
                return cur, reported
            cur, reported = schedule.advance(cur, win, t)
    return cur, reported


def flat(N: int, W: int, B: int, start: int = 0, tail: str = "roll", epochs: int = 0) -> Schedule:
    """One bucket, nothing known to skip: a dataset of one shape (or an index without shapes)."""
    return Schedule((N,), 0, (B,), W, (start,), tail, epochs)


@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12), seed=st.integers(0, 2**40),
       epoch=st.integers(0, 5), streams=st.integers(1, 8), buf=st.integers(0, 10))
@settings(max_examples=60, deadline=None, database=None)
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(sizes, seed, epoch, streams, buf):
    sh, ix = epoch_order(tuple(sizes), seed, epoch, streams, buf)
    pairs = sorted(zip(sh.tolist(), ix.tolist()))
    assert pairs == [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    sh2, ix2 = epoch_order.__wrapped__(tuple(sizes), seed, epoch, streams, buf)  # recomputed, not cached
    assert sh.tolist() == sh2.tolist() and ix.tolist() == ix2.tolist()


def test_epochs_and_seeds_give_different_orders():
    sizes = tuple([7, 3, 9, 5, 6, 2, 8, 4])
    a = epoch_order(sizes, 1, 0, 4, 8)[0].tolist()
    assert a != epoch_order(sizes, 1, 1, 4, 8)[0].tolist()
    assert a != epoch_order(sizes, 2, 0, 4, 8)[0].tolist()


@given(N=st.integers(1, 40), W=st.integers(1, 4), B=st.integers(1, 3), n=st.integers(0, 3),
       tail=st.sampled_from(["roll", "drop"]), epochs=st.integers(1, 3), start=st.integers(0, 60))
@settings(max_examples=150, deadline=None, database=None)
def test_every_position_is_served_once_by_exactly_one_reader(N, W, B, n, tail, epochs, start):
    if tail == "drop" and N < W * B:
        with pytest.raises(ConfigError, match="epoch_tail"):
            flat(N, W, B, 0, tail, epochs)
        return
    start = start if tail == "roll" else (start % N) // (W * B) * (W * B)
    sched = flat(N, W, B, start, tail, epochs)
    steps = sched.num_steps()
    table, _ = served(sched, steps, n)
    assert all(len(step) == W * B for step in table), "a slot of a step was served by no reader"
    flat_items = [i for step in table for _, i in step]
    assert len(set(flat_items)) == len(flat_items), "an item was served twice"
    if tail == "roll":  # consecutive items from the cursor, nothing skipped
        assert flat_items == list(range(start, start + steps * W * B))
        if steps:  # the last step reaches the end of the last epoch, and no step lies wholly past it
            assert flat_items[-1] >= epochs * N - 1 and flat_items[-1] - W * B < epochs * N - 1
    else:  # inside epochs: from the cursor, each epoch's served items are a prefix, tail < G dropped
        for e in range(start // N, epochs):
            ps = sorted(i - e * N for i in flat_items if i // N == e)
            lo = start % N if e == start // N else 0
            assert ps == list(range(lo, lo + len(ps))) and N - (lo + len(ps)) < W * B
    if tail == "roll":
        assert cursors_after(sched, steps) == ((start + steps * W * B,), 0)


@given(N=st.integers(5, 60), W1=st.integers(1, 4), W2=st.integers(1, 4), B1=st.integers(1, 3),
       B2=st.integers(1, 3), k=st.integers(0, 6), tail=st.sampled_from(["roll", "drop"]))
@settings(max_examples=150, deadline=None, database=None)
def test_resume_on_another_world_size_continues_the_same_global_stream(N, W1, W2, B1, B2, k, tail):
    if tail == "drop" and N < max(W1 * B1, W2 * B2):
        return
    first = flat(N, W1, B1, 0, tail)
    cursor = cursors_after(first, k)[0]
    resumed = flat(N, W2, B2, cursor[0], tail)
    before = [x for step in served(first, k, 1)[0] for x in step]
    after = [x for step in served(resumed, 4, 2)[0] for x in step]
    assert not set(before) & set(after), "an item served before the checkpoint is served again"
    if tail == "roll":
        full = flat(N, 1, 1, 0, tail)  # the uninterrupted run, one item per step
        ref = [x for step in served(full, k * W1 * B1 + 4 * W2 * B2, 0)[0] for x in step]
        assert before + after == ref
    else:  # drop: the resumed run serves the next items of the same epoch until fewer than G2 are left
        assert after[0] == (0, cursor[0]) or cursor[0] % N + W2 * B2 > N


def test_auto_streams_have_many_divisors_and_are_bounded_by_shards():
    assert resolve_num_streams(0, 7) == 6 and resolve_num_streams(0, 13) == 12
    assert resolve_num_streams(0, 50) == 48 and resolve_num_streams(0, 10_000) == 7680
    assert resolve_num_streams(0, 1) == 1 and resolve_num_streams(5, 100) == 5


@pytest.mark.parametrize("W,n", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (6, 2), (4, 3)])
def test_aligned_readers_read_disjoint_shards(W, n):
    """Equal streams and n*W | S: every shard is read by exactly one reader (no read amplification)."""
    sizes = tuple([5] * 24)
    S = 12
    sched = flat(sum(sizes), W, 2, 3 * W * 2 + 1, "roll", 1)  # resumed mid-epoch, off the step grid too
    sh, _ = epoch_order(sizes, 3, 0, S, 6)
    owners: dict[int, set] = {}
    for r in range(W):
        for w in range(n):
            for win in sched.windows():
                _, _, items, _ = reader_items(win, sched.batch, W, r, w, n)
                for s in set(sh[items[items < sum(sizes)]].tolist()):
                    owners.setdefault(s, set()).add((r, w))
    assert owners and all(len(v) == 1 for v in owners.values())


@pytest.mark.parametrize("W,n", [(2, 1), (3, 2), (4, 3), (6, 2)])
def test_uneven_shards_cost_at_most_the_cut_shards(W, n):
    """Uneven shards: only shards cut between two streams (at most S-1) are read by two readers."""
    rng = np.random.default_rng(0)
    sizes = tuple(int(x) for x in rng.integers(20, 60, size=48))
    S = 12
    sh, _ = epoch_order(sizes, 0, 0, S, 16)
    sched = flat(sum(sizes), W, 1, 0, "roll", 1)
    reads = 0
    for r in range(W):
        for w in range(n):
            for win in sched.windows():
                _, _, items, _ = reader_items(win, sched.batch, W, r, w, n)
                reads += len(set(sh[items[items < sum(sizes)]].tolist()))
    assert len(sizes) <= reads <= len(sizes) + S - 1
