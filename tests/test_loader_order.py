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

from data.order import Cursor, Schedule, epoch_order, resolve_num_streams
from jobconfig.errors import ConfigError


def served(schedule: Schedule, steps: int, workers: int) -> list[list[tuple[int, int]]]:
    """Per global step, the (epoch, position) list in slot order, assembled from every reader."""
    W, B = schedule.world_size, schedule.batch_size
    out = [[None] * (W * B) for _ in range(steps)]
    for r in range(W):
        for w in range(max(1, workers)):
            for epoch, ps, js in schedule.reader_positions(r, w, workers):
                for p, j in zip(ps.tolist(), js.tolist()):
                    s, i = divmod(j, B)
                    if s >= steps:
                        break
                    assert out[s][r + W * i] is None, "two readers claim the same slot"
                    out[s][r + W * i] = (epoch, p)
                if js.size and js[-1] // B >= steps:
                    break
    return out


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
            Schedule(N, W, B, Cursor(), tail, epochs)
        return
    cursor = Cursor(*divmod(start, N)) if tail == "roll" else Cursor(0, (start % N) // (W * B) * (W * B))
    sched = Schedule(N, W, B, cursor, tail, epochs)
    steps = sched.num_steps()
    table = served(sched, steps, n)
    flat = [x for step in table for x in step]
    assert None not in flat, "a slot of a step was served by no reader"
    assert len(set(flat)) == len(flat), "a position was served twice"
    first = (cursor.epoch, cursor.offset)
    if tail == "roll":  # consecutive global positions from the cursor, nothing skipped
        P = [e * N + p for e, p in flat]
        assert P == list(range(first[0] * N + first[1], first[0] * N + first[1] + steps * W * B))
        if steps:  # the last step reaches the end of the last epoch, and no step lies wholly past it
            assert P[-1] >= epochs * N - 1 and P[-1] - W * B < epochs * N - 1
    else:  # inside epochs: from the cursor, each epoch's served positions are a prefix, tail < G dropped
        for e in range(cursor.epoch, epochs):
            ps = sorted(p for ep, p in flat if ep == e)
            lo = cursor.offset if e == cursor.epoch else 0
            assert ps == list(range(lo, lo + len(ps))) and N - (lo + len(ps)) < W * B


@given(N=st.integers(5, 60), W1=st.integers(1, 4), W2=st.integers(1, 4), B1=st.integers(1, 3),
       B2=st.integers(1, 3), k=st.integers(0, 6), tail=st.sampled_from(["roll", "drop"]))
@settings(max_examples=150, deadline=None, database=None)
def test_resume_on_another_world_size_continues_the_same_global_stream(N, W1, W2, B1, B2, k, tail):
    if tail == "drop" and N < max(W1 * B1, W2 * B2):
        return
    full = Schedule(N, 1, 1, Cursor(), tail, 0)  # the uninterrupted run, one position per step
    first = Schedule(N, W1, B1, Cursor(), tail, 0)
    cursor = first.cursor_after(k)
    resumed = Schedule(N, W2, B2, cursor, tail, 0)
    after = [x for step in served(resumed, 4, 2) for x in step]
    before = [x for step in served(first, k, 1) for x in step]
    assert not set(before) & set(after), "a position served before the checkpoint is served again"
    if tail == "roll":
        ref = [x for step in served(full, k * W1 * B1 + 4 * W2 * B2, 0) for x in step]
        assert before + after == ref
    else:  # drop: the resumed run serves the next positions of the same epoch until fewer than G2 are left
        assert after[0] == (cursor.epoch, cursor.offset) or cursor.offset + W2 * B2 > N


def test_auto_streams_have_many_divisors_and_are_bounded_by_shards():
    assert resolve_num_streams(0, 7) == 6 and resolve_num_streams(0, 13) == 12
    assert resolve_num_streams(0, 50) == 48 and resolve_num_streams(0, 10_000) == 7680
    assert resolve_num_streams(0, 1) == 1 and resolve_num_streams(5, 100) == 5


@pytest.mark.parametrize("W,n", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (6, 2), (4, 3)])
def test_aligned_readers_read_disjoint_shards(W, n):
    """Equal streams and n*W | S: every shard is read by exactly one reader (no read amplification)."""
    sizes = tuple([5] * 24)
    S = 12
    sched = Schedule(sum(sizes), W, 2, Cursor(0, 3 * W * 2), "roll", 1)  # resumed mid-epoch, too
    sh, _ = epoch_order(sizes, 3, 0, S, 6)
    owners: dict[int, set] = {}
    for r in range(W):
        for w in range(n):
            for epoch, ps, _ in sched.reader_positions(r, w, n):
                for s in set(sh[ps].tolist()):
                    owners.setdefault(s, set()).add((r, w))
    assert owners and all(len(v) == 1 for v in owners.values())


@pytest.mark.parametrize("W,n", [(2, 1), (3, 2), (4, 3), (6, 2)])
def test_uneven_shards_cost_at_most_the_cut_shards(W, n):
    """Uneven shards: only shards cut between two streams (at most S-1) are read by two readers."""
    rng = np.random.default_rng(0)
    sizes = tuple(int(x) for x in rng.integers(20, 60, size=48))
    S = 12
    sh, _ = epoch_order(sizes, 0, 0, S, 16)
    sched = Schedule(sum(sizes), W, 1, Cursor(), "roll", 1)
    reads = 0
    for r in range(W):
        for w in range(n):
            for epoch, ps, _ in sched.reader_positions(r, w, n):
                if epoch == 0:
                    reads += len(set(sh[ps].tolist()))
    assert len(sizes) <= reads <= len(sizes) + S - 1
