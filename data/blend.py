"""Weighted blends of latent datasets: which source serves each global step, and the blend's cursor.

`data.sources` (jobconfig/data.py) lists datasets with weights. Every global
step (one micro batch of every data-parallel rank) is served whole by one
source: its own `LatentLoader` (data/loader.py), with its own order, shape
buckets, skips and cursor, takes that step exactly as it would alone. A
source's loader is advanced only on the steps that use it, so each source
serves the same batches, in the same order, as a run on that source alone
(with data.seed), only interleaved with the others.

**The mixture** (`Mixture`) is smooth weighted round-robin, the rule nginx
uses to spread requests over weighted servers: with integer weights w_i
summing to W, step t goes to the source of the largest (t+1) * w_i - W * c_i,
c_i being the steps source i served before t (ties: the lower index). It is
exact integer arithmetic on the weights, uses no seed and no state but t, so
every rank and every process derives the same source for step t, and it is
periodic: after W steps every source has served exactly w_i of them, so the
source of step t is `pattern[t % W]`, the counts before t are
(t // W) * w + the counts of the pattern's first t % W steps.

Why a deterministic schedule rather than a random draw per step: the counts
of a draw per step wander by about sqrt(t p (1 - p)) steps (+-27 of 1,000 at
3:1 over 4,000 steps), and a run of consecutive steps can all fall on one
source by chance. The round-robin keeps every prefix at its share: with
q_i = w_i / W, for all t

    t * q_i - (n - 1)^2 / n  <=  c_i(t)  <=  t * q_i + 1 - 1 / n

(n sources; proof: the chosen source's (t+1) q_i - c_i is the largest of n
numbers that sum to 1, so at least 1/n, and is then lowered by 1; the others
only grow; the deficits t q_i - c_i sum to 0). For two sources
|c_i(t) - t q_i| <= 1/2, so any k consecutive steps (one optimiser step's
micro batches, one logging window) hold k q_i +- 1 steps of each source. The
order of samples within a source is shuffled by its loader, so the pattern's
period does not show in the data. Weights are taken exactly as written (0.7
is 7/10) while W <= 2^16 = MAX_PERIOD; beyond that (e.g. 0.123456789 next
to 1) they are rounded to multiples of 1/2^16 of the total (largest
remainders, every source at least 1), and the counts track those.

A weight is a share of the *steps*: a step is one source's global batch, so
with equal batch sizes it is the share of the samples too; a source whose
shape buckets take bigger batches (data.batch_tokens) gets more samples per
step. The loader's skips count as it counts them: a skip found at read time
keeps its slot in the step, a known skip takes none.

**State** (`Blend.state_dict`): the step, the sources' names and integer
weights (checked on resume: another mixture would serve other data), and
each source's loader state, which does not depend on the world size, so a
resume on any number of ranks continues every source where it stopped and
the mixture at the same step. A blend of one source is that source's loader
unchanged: same batches, and its state is the loader's own (a checkpoint of
a `data.root` run resumes a one-source `data.sources` run and the reverse).
With data.epochs set, each loader stops after its own epochs and the blend
ends at the first step whose source has ended.

**Rows**: the trainer seeds each row's noise with its global index
(pretrain/training/objective.py, row_seed); a loader's global indices are
epoch * N + position within its own dataset, so two sources would share
them. `Blend.rows` gives row g of source i the index g * n + i: distinct
across the blend, and g itself for one source.

**Reports**: `describe` gives each source's samples, shape buckets with
their per-rank batch sizes, and early (known) skips by reason, read from
the loader's buckets (logged once by data/sources.py); `drawn` counts the
samples each source served on this rank; a blend of several sources names
its source in every skip reason (`name/too_short`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from fractions import Fraction
from math import gcd, lcm

import numpy as np

from data.batching import LatentBatch
from data.buckets import SKIP_CODES
from data.loader import LatentLoader
from jobconfig.data import DataConfig, SourceConfig
from jobconfig.errors import ConfigError

MAX_PERIOD = 1 << 16
STATE_VERSION = 1


def integer_weights(weights: Sequence[float], max_period: int = MAX_PERIOD) -> tuple[int, ...]:
    """The weights as the smallest integers of the same ratios (0.75, 0.25 -> 3, 1), or, when those sum
    past `max_period`, rounded to `max_period` in all (largest remainders, each at least 1)."""
    if not weights or any(not (w > 0) for w in weights):
        raise ConfigError(f"data.sources: weights {list(weights)}, expected positive numbers")
    exact = [Fraction(repr(float(w))) for w in weights]
    den = lcm(*(f.denominator for f in exact))
    ints = [int(f * den) for f in exact]
    g = gcd(*ints)
    ints = [i // g for i in ints]
    if sum(ints) <= max_period:
        return tuple(ints)
    if len(ints) > max_period:
        raise ConfigError(f"data.sources: {len(ints)} sources, at most {max_period}")
    total = sum(exact)
    quota = [f / total * (max_period - len(ints)) for f in exact]  # 1 each first, the rest by quota
    out = [1 + int(q) for q in quota]
    for i in sorted(range(len(out)), key=lambda i: (-(quota[i] - int(quota[i])), i))[:max_period - sum(out)]:
        out[i] += 1
    return tuple(out)


class Mixture:
    """Smooth weighted round-robin over integer weights (module docstring): the source of every step."""

    def __init__(self, weights: Sequence[float]):
        self.weights = integer_weights(weights)
        self.period = sum(self.weights)
        n, cur, pattern = len(self.weights), [0] * len(self.weights), []
        for _ in range(self.period if n > 1 else 1):
            for i in range(n):
                cur[i] += self.weights[i]
            k = max(range(n), key=cur.__getitem__)  # the first of the largest: ties go to the lower index
            cur[k] -= self.period
            pattern.append(k)
        self.pattern = np.asarray(pattern, dtype=np.int32)
        self._per_period = np.bincount(self.pattern, minlength=n)

    @property
    def shares(self) -> tuple[float, ...]:
        """q_i = w_i / W: the fraction of steps each source serves."""
        return tuple(w / self.period for w in self.weights)

    def source(self, t: int) -> int:
        """The source of global step t."""
        return int(self.pattern[t % len(self.pattern)])

    def counts(self, t: int) -> tuple[int, ...]:
        """Steps each source serves among steps 0..t-1."""
        full, rest = divmod(t, len(self.pattern))
        head = np.bincount(self.pattern[:rest], minlength=len(self.weights))
        return tuple(int(x) for x in full * self._per_period + head)

    def bound(self, n: int | None = None) -> tuple[float, float]:
        """(lo, hi): c_i(t) - t * q_i lies in [lo, hi] for every source and step (module docstring)."""
        n = len(self.weights) if n is None else n
        return -(n - 1) ** 2 / n, 1 - 1 / n


class Blend:
    """One rank's view of several sources: each step, the mixture's source hands out its next batch.

    `loaders` are the sources' LatentLoaders of this rank (one per source, in config order)."""

    def __init__(self, loaders: Sequence[LatentLoader], names: Sequence[str], weights: Sequence[float]):
        if not (len(loaders) == len(names) == len(weights)) or not loaders:
            raise ValueError("a blend needs one name and one weight per loader, and at least one loader")
        self.loaders, self.names = list(loaders), list(names)
        self.mixture = Mixture(weights)
        self.step = 0                            # global steps handed out: the mixture's cursor
        self.drawn: Counter = Counter()          # samples served per source name on this rank
        self._its: list[Iterator[LatentBatch] | None] = [None] * len(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)

    @property
    def max_batch_size(self) -> int:
        return max(loader.max_batch_size for loader in self.loaders)

    def next(self) -> tuple[int, LatentBatch]:
        """(source index, this rank's batch) of the next global step. StopIteration when that source has
        served its data.epochs."""
        i = self.mixture.source(self.step)
        if self._its[i] is None:  # started on first use: a source never drawn starts no workers
            self._its[i] = iter(self.loaders[i])
        batch = next(self._its[i])  # the loader's state now includes this step
        self.step += 1
        self.drawn[self.names[i]] += sum(len(row) for row in batch.clips)
        if len(self.loaders) > 1:
            batch.skipped = [(g, key, f"{self.names[i]}/{reason}") for g, key, reason in batch.skipped]
        return i, batch

    def __iter__(self) -> Iterator[tuple[int, LatentBatch]]:
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def rows(self, source: int, batch: LatentBatch) -> list[int]:
        """Global row indices distinct across the blend: g * n + source (g itself for one source)."""
        n = len(self.loaders)
        return [g * n + source for g in batch.row_index]

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if len(self.loaders) == 1:
            return self.loaders[0].state_dict()
        return {"version": STATE_VERSION, "step": self.step, "names": list(self.names),
                "weights": list(self.mixture.weights), "loaders": [lo.state_dict() for lo in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        n = len(self.loaders)
        if n == 1:
            if "loaders" in state:
                raise ConfigError(f"loader state: a blend of {len(state['loaders'])} sources {state.get('names')}, "
                                  "but this stage reads one dataset (data.root, or data.sources of one entry); "
                                  "resume with the same data.sources, or --resume fresh")
            self.loaders[0].load_state_dict(state)
        else:
            if "loaders" not in state:
                raise ConfigError(f"loader state: one dataset's loader, but this stage blends {n} sources "
                                  f"{self.names} (data.sources); resume with the same data, or --resume fresh")
            if state.get("version") != STATE_VERSION:
                raise ConfigError(f"blend state: version {state.get('version')!r}, expected {STATE_VERSION}")
            now = {"names": list(self.names), "weights": list(self.mixture.weights)}
            for key, want in now.items():
                if state.get(key) != want:
                    raise ConfigError(f"blend state: source {key} {state.get(key)!r} in the checkpoint but {want!r} "
                                      "now (data.sources); the mixture would differ: resume with the same sources "
                                      "and weights, or --resume fresh")
            step = state.get("step")
            if not isinstance(step, int) or step < 0 or len(state["loaders"]) != n:
                raise ConfigError(f"blend state: step {step!r} and {len(state['loaders'])} loader states, expected "
                                  f"a non-negative step and {n}")
            for name, loader, sub in zip(self.names, self.loaders, state["loaders"]):
                try:
                    loader.load_state_dict(sub)
                except ConfigError as e:
                    raise ConfigError(f"data source {name}: {e}") from None
            self.step = step
        self._its = [None] * n

    # ------------------------------------------------------------ reports
    def describe(self) -> list[dict]:
        """Per source: name, root, share of steps, samples, shape buckets {HxW: (samples, per-rank batch)},
        and known skips by reason (read from its index, before any step)."""
        out = []
        for name, loader, q in zip(self.names, self.loaders, self.mixture.shares):
            bk = loader.buckets
            codes = bk.code[bk.code < 0]
            skips = {SKIP_CODES[int(c)]: int((codes == c).sum()) for c in np.unique(codes)}
            out.append({"name": name, "root": loader.cfg.root, "share": q,
                        "samples": sum(bk.sizes) + bk.num_known_skips,
                        "buckets": {b: (n, B) for b, n, B in zip(bk.names, bk.sizes, bk.batch)},
                        "known_skips": skips})
        return out


def describe_line(d: dict) -> str:
    """One log line of `Blend.describe`'s entry for a source."""
    buckets = ", ".join(f"{b}: {n} (batch {B})" for b, (n, B) in d["buckets"].items())
    skips = sum(d["known_skips"].values())
    why = ", ".join(f"{k}: {v}" for k, v in sorted(d["known_skips"].items()))
    return (f"data source {d['name']} ({d['root']}, {100 * d['share']:.1f}% of steps): {d['samples']} samples; "
            f"shape buckets {buckets}; {skips} known skips" + (f" ({why})" if why else ""))


def open_blend(cfg: DataConfig, rank: int = 0, world_size: int = 1, heldout: float = 0.0) -> Blend:
    """The blend `cfg` names (data.sources, or data.root as one source) for data-parallel rank `rank`;
    each dataset's held-out split at fraction `heldout` (data/heldout_split.py) is never served."""
    sources: list[SourceConfig] = cfg.blend()
    loaders = []
    for i, src in enumerate(sources):
        one = dataclasses.replace(cfg, root=src.root, storage_options=cfg.options_of(src), sources=[])
        try:
            loaders.append(LatentLoader(one, rank=rank, world_size=world_size, heldout=heldout))
        except ConfigError as e:
            if not cfg.sources:
                raise
            raise ConfigError(f"data.sources[{i}] ({src.label}): {e}") from None
    return Blend(loaders, [s.label for s in sources], [s.weight for s in sources])
