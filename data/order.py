"""The global sample order and who reads what: pure functions of metadata.

Everything here is computed from index.json alone (shard names, sample counts,
hashes), never from data, rank or worker state, so every process of every run
derives the same answers.

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
     the end of the epoch).

**Global stream**: epochs follow each other; global position P = epoch * N + p.
Global step s covers G = world * batch consecutive positions; rank r takes
the *strided* slots r, r + W, r + 2W, ... of each step (not a contiguous
block), and DataLoader worker w of n takes the rank-local samples j with
j % n == w. Together: reader (r, w) gets exactly the positions
P = P0 + r + W*w (mod n*W), P0 being where the run (or resume) started.

**Why strided + streams** (the locality tradeoff): positions of one residue
class mod n*W hit the streams p % S of one residue class mod gcd(n*W, S).
When n*W divides S, each reader gets whole streams, i.e. reads only its own
shards, and this stays true for any resume offset P0; the only shards read
by two readers are the (at most S-1) shards cut between two streams, so the
read amplification is at most 1 + (S-1)/shards (S=12 over 240 shards: 5%).
When it does not divide, a reader reads S/gcd(n*W, S) streams and skips the
samples that are not its own (read amplification n*W/gcd). The order itself
never depends on W or n, so a change of world size or worker count on resume
costs locality at worst, never correctness. `S` defaults to a number <= the
shard count with many divisors (2^a * 3^b * 5^c, e.g. 48 for 50 shards, 7680
for 10k); set `data.num_streams` to a multiple of every world*workers you
plan to run with, for perfect locality. The alternatives: block assignment
of shards to ranks gives perfect locality but makes the order depend on the
world size (Energon then refuses DP-size changes); an unsharded global
shuffle buffer makes every rank read every shard.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Literal

import numpy as np

from jobconfig.errors import ConfigError


@dataclass(frozen=True)
class DatasetMeta:
    """What the order needs from index.json."""
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    sha256: tuple[str, ...]
    num_bytes: tuple[int, ...]

    @classmethod
    def from_index(cls, index: dict, where: str = "index.json") -> "DatasetMeta":
        try:
            shards = [s for s in index["shards"] if int(s["num_samples"]) > 0]
            meta = cls(tuple(s["name"] for s in shards), tuple(int(s["num_samples"]) for s in shards),
                       tuple(s["sha256"] for s in shards), tuple(int(s["bytes"]) for s in shards))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: shard list lacks {e} (expected name, num_samples, sha256, bytes)") from None
        if not meta.names:
            raise ConfigError(f"{where}: the dataset has no samples")
        return meta

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def fingerprint(self) -> str:
        """Changes when any shard is added, removed or rewritten: a resumed run must see the same data."""
        blob = json.dumps([self.names, self.sizes, self.sha256]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


@lru_cache(maxsize=2)  # the current epoch and the next (a rolled step spans two)
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


@dataclass(frozen=True)
class Cursor:
    """Where the global stream stands: the next unconsumed position `offset` of `epoch`."""
    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Schedule:
    """Global steps from a cursor: which positions each step, rank and worker get.

    epoch_tail 'roll': the stream runs on across epochs; a step that reaches the
    end of an epoch is completed with the first positions of the next epoch's
    order (nothing dropped, nothing repeated; with `epochs` set, the last step
    borrows from epoch `epochs`). 'drop': every step lies inside one epoch; the
    last N mod G positions of an epoch are not served in that epoch.
    """
    num_samples: int
    world_size: int
    batch_size: int
    start: Cursor
    tail: Literal["roll", "drop"] = "roll"
    epochs: int = 0  # 0: endless

    def __post_init__(self):
        if self.tail == "drop" and self.num_samples < self.global_batch:
            raise ConfigError(f"data.epoch_tail: 'drop' with {self.num_samples} samples per epoch and a global "
                              f"batch of {self.global_batch} would never serve a step; use 'roll'")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def _steps_in_epoch(self, epoch: int) -> int:
        first = self.start.offset if epoch == self.start.epoch else 0
        return (self.num_samples - first) // self.global_batch

    def num_steps(self) -> int | None:
        """Global steps until the configured end; None when endless."""
        if not self.epochs:
            return None
        N, G = self.num_samples, self.global_batch
        if self.tail == "roll":
            left = self.epochs * N - (self.start.epoch * N + self.start.offset)
            return max(0, -(-left // G))
        return sum(self._steps_in_epoch(e) for e in range(self.start.epoch, self.epochs))

    def cursor_after(self, steps: int) -> Cursor:
        N, G = self.num_samples, self.global_batch
        if self.tail == "roll":
            return Cursor(*divmod(self.start.epoch * N + self.start.offset + steps * G, N))
        epoch, offset = self.start.epoch, self.start.offset
        while steps:
            take = min(steps, (N - offset) // G)
            if take == 0:
                epoch, offset = epoch + 1, 0
                continue
            offset += take * G
            steps -= take
        return Cursor(epoch, offset)

    def reader_positions(self, rank: int, worker: int,
                         num_workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per epoch, in order: (epoch, positions p, rank-local sample numbers j) of reader (rank, worker)."""
        N, G, W, B = self.num_samples, self.global_batch, self.world_size, self.batch_size
        n = max(1, num_workers)
        total = self.num_steps()
        epoch, steps_before = self.start.epoch, 0
        while total is None or steps_before < total:
            if self.tail == "roll":
                P0 = self.start.epoch * N + self.start.offset
                lo, hi = max(epoch * N, P0), (epoch + 1) * N
                if total is not None:
                    hi = min(hi, P0 + total * G)
                if lo >= hi:
                    return
                # P = P0 + W*j + rank, j % n == worker
                j_lo = max(0, -(-(lo - P0 - rank) // W))
                j_hi = -(-(hi - P0 - rank) // W)
                j = np.arange(j_lo + (worker - j_lo) % n, max(j_lo, j_hi), n, dtype=np.int64)
                yield epoch, P0 + W * j + rank - epoch * N, j
            else:
                m = self._steps_in_epoch(epoch)
                if total is not None:
                    m = min(m, total - steps_before)
                first = self.start.offset if epoch == self.start.epoch else 0
                s = np.arange(m, dtype=np.int64)[:, None]
                i = np.arange(B, dtype=np.int64)[None, :]
                j = ((steps_before + s) * B + i).ravel()
                q = (first + s * G + rank + W * i).ravel()
                keep = j % n == worker
                yield epoch, q[keep], j[keep]
                steps_before += m
            epoch += 1
