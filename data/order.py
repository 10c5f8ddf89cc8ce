"""The global sample order and who reads what: pure arithmetic on metadata.

Everything here is computed from the shards' sample counts (index.json, read
by data/shard_format.py) and each sample's bucket code (data/buckets.py),
never from data, rank or worker state, so every process of every run derives
the same answers. Nothing here reads a file. A sample is a video
(data/videos.py: the `sizes` given here count each shard's videos, however
many segments store them), so a long video is one item of each epoch.

**Epoch order** (`epoch_order`): a pure function of (seed, epoch) over the
dataset's shards:
  1. shards are permuted with an RNG seeded by (seed, epoch);
  2. the permuted shards' samples, concatenated, are cut into `S` equal
     *streams* (lengths differ by at most 1); a stream is a run of whole
     shards plus parts of the two shards at its ends;
  3. each stream's samples (its shards' samples, in order) get a bounded
     shuffle: sample i is emitted in the order of i + K * u_i, u_i ~ U[0, 1)
     (seeded by (seed, epoch, stream)). An item moves at most K places, so a
     reader holds about K samples of a stream beyond the shard it is reading
     (data/shards.py): a shuffle buffer of size K whose output is known
     before any byte is read, which is what makes resume exact and cheap;
  4. streams are interleaved round-robin: position p takes sample p // S of
     stream p % S (the first N % S streams are one longer, so this holds to
     the end of the epoch). A sample is named by (epoch, p); its per-sample
     randomness and its global index epoch * N + p derive from that name.

**Buckets** (data/buckets.py, given here as each sample's bucket code): every sample is in one
shape bucket (same latent h x w, so a batch of one bucket has one shape), or
is known unusable for the stage from its recorded frame count (a *known
skip*, reported without reading it). Bucket b's *stream* lists its n_b
samples of epoch e, then of epoch e+1, ...; within an epoch it is built like
the epoch order: the bucket's samples in stream order (stream 0's, then
stream 1's, ...) cut into S equal *pieces*, interleaved round-robin, rotated
by e * n_b so that item i of the bucket stream always comes from piece
i % S. Piece k is stream k's samples of the bucket give or take a few at
its ends. With one bucket and no known skips this is exactly the epoch order
above. Known skips form one more stream the same way.

**Steps** (`Schedule`): a global step takes the next G_b = world * batch_b
items of one bucket's stream (batch_b: data.batch_size, or the bucket's own
size). Steps go in the order of their first item's *progress* i / n_b through
its bucket stream (ties: lower bucket first): every bucket moves through its
epochs at the same pace, so batches of the shapes are mixed in proportion.
The known skips are reported at the same pace: step t reports those of
progress in [F_{t-1}, F_t), F_t being the progress of the next step. Progress
is an integer, (epoch << 32) + floor(2^32 * offset / n_b), so every process
sorts identically. The state is one cursor per bucket (items consumed, moved
past a step by `Schedule.advance`) plus the count of known skips reported;
the bucket streams do not depend on world size, batch sizes or workers, so a
resume on any layout continues every bucket exactly where it stopped (only
how the buckets interleave over steps depends on G).

**Ranks and workers**: rank r takes the items i = r (mod W) of each step
(any G_b consecutive items hold batch_b of each class), and DataLoader worker
w of n the rank's items with i // W = w (mod n): reader (r, w) gets the items
i = r + W*w (mod n*W) of every bucket, whatever the cursor. Known skips:
skip k goes to rank k % W, worker (k // W) % n.

**Why pieces + streams** (the locality tradeoff): item i of a bucket stream
comes from piece i % S, mostly stream i % S, so when n*W divides S each
reader gets whole pieces, i.e. reads little but its own shards, and this
stays true for any resume cursor and every bucket; the shards read by two
readers are the (at most S-1) shards cut between two streams, plus, per
bucket, the shards at the ends of streams where a piece boundary differs
from the stream boundary (a few per stream and bucket: the bucket's share of
streams varies). When n*W does not divide S, a reader reads S/gcd(n*W, S)
streams. Every bucket's pieces advance through their streams at the same
pace, so a reader holds few shards at once however the shapes mix.
The order never depends on W or n, so a change of world size or worker count
on resume costs locality at worst, never correctness. `S` defaults to a
number <= the shard count with many divisors (2^a * 3^b * 5^c, e.g. 48 for
50 shards, 7680 for 10k); set `data.num_streams` to a multiple of every
world*workers you plan to run with, for perfect locality. Shapes clustered by
shard (e.g. a source that is all 4:3 in a run of shards) move piece
boundaries further from stream boundaries (more shared shards) and make one
stream's buckets advance at different depths (a reader holds that stream's
shards longer). The alternatives: block assignment of shards to ranks gives perfect
locality but makes the order depend on the world size (Energon then refuses
DP-size changes); an unsharded global shuffle buffer makes every rank read
every shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Literal

import numpy as np

from jobconfig.errors import ConfigError

PROGRESS_BITS = 32
_FRAC = (1 << PROGRESS_BITS) - 1


def resolve_num_streams(configured: int, num_shards: int) -> int:
    """`configured`, or auto: among 2^a * 3^b * 5^c <= num_shards (b, c <= 1), the one with the most
    divisors (then the largest), so that typical reader counts (powers of two, x3, x5) divide it."""
    if configured:
        return configured
    best = (1, 1)
    for b in (1, 3):
        for c in (1, 5):
            m = b * c
            a = 0
            while m <= num_shards:
                best = max(best, ((a + 1) * (2 if b > 1 else 1) * (2 if c > 1 else 1), m))
                m, a = m * 2, a + 1
    return best[1]


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([w & 0xFFFFFFFF for w in words]
                                                        + [w >> 32 & 0xFFFFFFFF for w in words]))


@lru_cache(maxsize=3)  # the current epoch and the next (a rolled step spans two)
def epoch_order(sizes: tuple[int, ...], seed: int, epoch: int, num_streams: int,
                shuffle_buffer: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, sample index within shard) for every position p of the epoch."""
    perm = _rng(seed, epoch, 0x5EED).permutation(len(sizes))
    # int32: 8 bytes per sample per cached epoch (80 MB for 10M samples)
    all_sh = np.concatenate([np.full(sizes[s], s, dtype=np.int32) for s in perm])
    all_ix = np.concatenate([np.arange(sizes[s], dtype=np.int32) for s in perm])
    N = len(all_sh)
    out_sh, out_ix = np.empty_like(all_sh), np.empty_like(all_ix)
    L, extra = divmod(N, num_streams)
    for j in range(min(num_streams, N)):
        # equal slices; the first N % S streams get one more sample, so that sample i of stream j
        # lands at position i * S + j everywhere, even in the last (partial) round
        lo, hi = j * L + min(j, extra), (j + 1) * L + min(j + 1, extra)
        sh, ix = all_sh[lo:hi], all_ix[lo:hi]
        if shuffle_buffer > 0:
            keys = np.arange(hi - lo) + shuffle_buffer * _rng(seed, epoch, j, 0xB0FF).random(hi - lo)
            perm_j = np.argsort(keys, kind="stable")
            sh, ix = sh[perm_j], ix[perm_j]
        out_sh[j::num_streams], out_ix[j::num_streams] = sh, ix
    return out_sh, out_ix


def _pieces(pos: np.ndarray, num_streams: int, rotate: int) -> np.ndarray:
    """Epoch positions of a bucket reordered like the epoch order itself: stream-major (stream 0's in
    order, then stream 1's, ...), cut into S equal pieces, interleaved round-robin from piece `rotate`
    (item m is element m // S of piece (m + rotate) % S; the pieces that round reaches once more are
    the longer ones)."""
    S, n = num_streams, len(pos)
    major = pos[np.lexsort((pos // S, pos % S))]
    L, extra = divmod(n, S)
    lengths = L + (((np.arange(S) - rotate) % S) < extra)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    m = np.arange(n, dtype=np.int64)
    return major[starts[(m % S + rotate) % S] + m // S]


def bucket_streams(sizes: tuple[int, ...], code: np.ndarray, num_buckets: int, seed: int, epoch: int,
                   num_streams: int, shuffle_buffer: int) -> tuple[np.ndarray, ...]:
    """Epoch positions p of each bucket's stream in this epoch, then of the known skips' stream.
    `code`: each sample's bucket (< 0: a known skip) by flat index (shards in index order)."""
    sh, ix = epoch_order(sizes, seed, epoch, num_streams, shuffle_buffer)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = num_buckets == 1 and bool((code >= 0).all())
    code = code[offsets[sh] + ix]
    out = []
    for b in range(num_buckets + 1):
        pos = np.flatnonzero(code == b if b < num_buckets else code < 0).astype(np.int64)
        rotate = 0 if flat else (epoch * len(pos)) % num_streams
        out.append(_pieces(pos, num_streams, rotate))
    return tuple(out)


def progress(i, n):
    """Integer progress of item i of a stream of n items per epoch: (epoch << 32) + 2^32 * offset // n."""
    return ((i // n) << PROGRESS_BITS) + (((i % n) << PROGRESS_BITS) // n)


def first_at(F, n):
    """The first item of a stream of n per epoch whose progress is >= F."""
    return (F >> PROGRESS_BITS) * n + -(-((F & _FRAC) * n) >> PROGRESS_BITS)


@dataclass(frozen=True)
class Window:
    """The global steps whose first item lies in one epoch, in order (arrays over those steps)."""
    epoch: int
    first_step: int          # global step number (since the schedule's start) of the first
    bucket: np.ndarray
    start: np.ndarray        # bucket-stream index of the step's first item
    skips_lo: np.ndarray     # known skips [lo, hi) (skip-stream indices) the step reports
    skips_hi: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket)


@dataclass(frozen=True)
class Schedule:
    """Global steps from per-bucket cursors (items consumed), see the module docstring.

    epoch_tail 'roll': a bucket's stream runs on across epochs; the step that reaches the end of
    its epoch is completed with the first items of the next epoch's (nothing dropped, nothing
    repeated; with `epochs` set, the last step of a bucket borrows from epoch `epochs`). A bucket
    smaller than its global batch repeats samples of consecutive epochs within a step. 'drop':
    every step lies inside one epoch of its bucket; the last n_b mod G_b items of each epoch are
    not served in that epoch (a bucket smaller than its global batch is never served).
    """
    sizes: tuple[int, ...]        # n_b: items of each bucket per epoch
    num_skips: int                # known skips per epoch
    batch: tuple[int, ...]        # per-rank batch size of each bucket
    world_size: int
    start: tuple[int, ...]        # cursors: items of each bucket consumed
    tail: Literal["roll", "drop"] = "roll"
    epochs: int = 0               # 0: endless
    skips_start: int = 0          # known skips reported before the start

    def __post_init__(self):
        if self.tail == "drop" and not any(n >= g for n, g in zip(self.sizes, self.global_batch)):
            raise ConfigError(f"data.epoch_tail: 'drop' with {max(self.sizes)} samples per epoch in the largest "
                              f"shape bucket and a global batch of {min(self.global_batch)} would never serve a "
                              "step; use 'roll'")

    @property
    def global_batch(self) -> tuple[int, ...]:
        return tuple(self.world_size * b for b in self.batch)

    def _active(self) -> list[int]:
        return [b for b, (n, g) in enumerate(zip(self.sizes, self.global_batch)) if self.tail == "roll" or n >= g]

    def normalize(self, b: int, c: int) -> int:
        """Cursor c of bucket b where its next step starts ('drop': at the next epoch if less than G_b is left)."""
        n, G = self.sizes[b], self.global_batch[b]
        if self.tail == "drop" and c % n + G > n:
            return (c // n + 1) * n
        return c

    def num_steps(self) -> int | None:
        """Global steps until the configured end; None when endless."""
        if not self.epochs:
            return None
        E, total = self.epochs, 0
        for b in self._active():
            n, G, c = self.sizes[b], self.global_batch[b], self.normalize(b, self.start[b])
            if self.tail == "roll":
                total += max(0, -(-(E * n - c) // G))
            elif c < E * n:
                total += (n - c % n) // G + (E - 1 - c // n) * (n // G)
        return total

    def _chunks(self, b: int, e: int) -> tuple[np.ndarray, int]:
        """Start indices of bucket b's steps whose first item is in epoch e, and its next start after them."""
        n, G = self.sizes[b], self.global_batch[b]
        c = self.normalize(b, self.start[b])
        if self.tail == "roll":
            k_lo = max(0, -(-(e * n - c) // G))
            k_hi = max(k_lo, -(-((e + 1) * n - c) // G))
            if self.epochs:
                k_end = max(0, -(-(self.epochs * n - c) // G))
                k_lo, k_hi = min(k_lo, k_end), min(k_hi, k_end)
            return c + G * np.arange(k_lo, k_hi, dtype=np.int64), c + G * k_hi
        if (self.epochs and e >= self.epochs) or c >= (e + 1) * n:
            return np.zeros(0, dtype=np.int64), max(c, (e + 1) * n)
        s0 = max(c, e * n)
        return s0 + G * np.arange(((e + 1) * n - s0) // G, dtype=np.int64), (e + 1) * n

    def windows(self) -> Iterator[Window]:
        """The steps from the cursors to the end (or endlessly), one window per epoch of first items."""
        active, total = self._active(), self.num_steps()
        reported = self.skips_start
        e = min(self.normalize(b, self.start[b]) // self.sizes[b] for b in active)
        done = 0
        while total is None or done < total:
            parts = [self._chunks(b, e) for b in active]
            starts = np.concatenate([s for s, _ in parts])
            bucket = np.concatenate([np.full(len(s), b, dtype=np.int64) for b, (s, _) in zip(active, parts)])
            n_of = np.asarray(self.sizes, dtype=np.int64)[bucket]
            order = np.lexsort((bucket, progress(starts, n_of)))
            starts, bucket, n_of = starts[order], bucket[order], n_of[order]
            keys = progress(starts, n_of)
            after = min(progress(nxt, self.sizes[b]) for b, (_, nxt) in zip(active, parts))
            F = np.concatenate([keys[1:], [after]]).astype(np.int64)
            # skips below the frontier, never below what was reported (a resume on another layout may
            # see a lower frontier: in 'drop', a bucket never served before can be served now)
            hi = np.maximum.accumulate(np.maximum(first_at(F, self.num_skips), reported)) if self.num_skips \
                else np.zeros(len(starts), dtype=np.int64)
            lo = np.concatenate([[reported], hi[:-1]]).astype(np.int64)
            if len(starts):
                reported = int(hi[-1])
                yield Window(e, done, bucket, starts, lo, hi)
            done += len(starts)
            e += 1

    def advance(self, cursors: tuple[int, ...], w: Window, t: int) -> tuple[tuple[int, ...], int]:
        """The cursors, and the count of known skips reported, once step t of window w is served."""
        b = int(w.bucket[t])
        cur = list(cursors)
        cur[b] = self.normalize(b, int(w.start[t]) + self.global_batch[b])
        return tuple(cur), int(w.skips_hi[t])


def reader_items(w: Window, batch: tuple[int, ...], world: int, rank: int, worker: int,
                 workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reader (rank, worker)'s items of a window: (step, bucket, bucket-stream index) of its samples,
    in step then slot order, and (step, skip-stream index) of its known skips."""
    n = max(1, workers)
    B = np.asarray(batch, dtype=np.int64)[w.bucket]
    step = np.repeat(np.arange(len(w), dtype=np.int64) + w.first_step, B)
    slot = np.arange(int(B.sum()), dtype=np.int64) - np.repeat(np.cumsum(B) - B, B)
    i = np.repeat(w.start + (rank - w.start) % world, B) + world * slot
    keep = (i // world) % n == worker
    samples = (step[keep], np.repeat(w.bucket, B)[keep], i[keep])
    cnt = w.skips_hi - w.skips_lo
    k = np.repeat(w.skips_lo, cnt) + np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    kstep = np.repeat(np.arange(len(w), dtype=np.int64) + w.first_step, cnt)
    kk = (k % world == rank) & ((k // world) % n == worker)
    return (*samples, np.stack([kstep[kk], k[kk]]))
