"""Streaming latent loader with exact resume, across ranks, workers and world sizes.

Data order is a pure function of (seed, epoch, position) (data/order.py): the
epoch order is fixed by the seed and the dataset alone, and so is every shape
bucket's stream of samples (data/buckets.py: samples of one latent h x w).
A sample is a video (data/videos.py): a long video stored as several segments
is one sample per epoch, its window drawn over the whole video, and the
reader reads only the segments the window touches.
Global step s serves G_b = world_size * batch_b consecutive items of one
bucket's stream, so every batch has one latent shape; steps of the buckets
interleave in proportion to their sizes. Rank r takes the items i = r
(mod W) of the step, worker w of its DataLoader those with i // W = w (mod
n), and the DataLoader hands the workers' parts back round-robin. Per-sample
randomness (start frame, interval, clip cuts; data/stage.py) comes from an
RNG seeded by (seed, epoch, position).

State (`state_dict`) is one cursor per shape bucket (items of its stream
consumed) and the count of known skips reported, plus what defines the order
(seed, shuffle buffer, streams, tail rule, dataset and bucket fingerprints),
checked on `load_state_dict`. It does not depend on the world size, batch
sizes or worker count: resume on any number of ranks serves every bucket's
stream exactly from where it stopped (same samples, same frames and clips).
The state is counted in the main process from the steps *handed out*, so
samples prefetched by workers but not consumed are served again after resume.
It also records the index version (shard count, columns file) its epoch uses
and the epoch of the last step: a run resumed on a dataset that grew since
finishes the epoch in progress over the old shards and takes the new samples
from the next epoch on; a dataset whose old shards changed is refused
(data/growth.py).

Early filtering (data/buckets.py decides, this module only reads): with the
shapes index.json records per stored sample, a video too short for the stage (or
whose shortest draw exceeds max_tokens) is a *known skip*: it takes no batch
slot, is reported (counted by reason, like every skip) by the step at whose
pace the skip stream has reached it, and is never read; a shard of nothing
else is never fetched. A sample some draw of whose shape could exceed
max_tokens is planned (frames, interval, clips) before its shard is fetched,
so a drawn clip partition over max_tokens is skipped unread, in its slot; so is
a video of several segments (its window names the segments to read); any
other is planned once decoded. An older index without shapes gives one bucket
and finds every skip at read time.

Every item yields exactly one record on exactly one rank, a sample or a
counted skip (too many tokens, corrupt shard or undecodable sample under
data.corrupt_shards='skip'; 'fail' raises instead, naming the shard; a sample
whose decoded shape differs from the recorded one is an undecodable sample),
and every rank takes the same number of steps: no end-of-epoch hang with
uneven shards. A step whose items were all skipped on a rank is a 0-row
batch for that rank (the trainer runs it as a zero-loss step, still joining
collectives).

Epoch tail (data.epoch_tail), the drop/pad rule, per bucket: 'roll' (default)
never drops and never pads: the step that reaches the end of a bucket's epoch
e is completed with the first items of its epoch e+1 (which epoch e+1 then
does not serve again), so every sample of every epoch is served exactly once,
and with data.epochs = E the run is sum_b ceil((E*n_b - cursor_b) / G_b)
steps. 'drop' keeps steps inside epochs: the last n_b mod G_b items of each
bucket's epoch are not served in that epoch (the same on every rank, a
different set each epoch since the order is reshuffled).

Workers: each sends one message per step with its part of the step
(data/worker_wire.py); the main process merges the parts of a step and
collates the batch.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import patches_per_frame
from data.batching import LatentBatch, SampleRecord, collate
from data.buckets import SKIP_BAD_SAMPLE, SKIP_CODES, SKIP_CORRUPT, Buckets, build_buckets, plan_or_skip, token_range
from data.dataset_index import DatasetMeta, read_index
from data.growth import Growth, grown_prefix, growth_epoch, log_growth
from data.order import Schedule, Window, bucket_streams, epoch_order, reader_items, resolve_num_streams
from data.shard_format import ShardFormatError, decode_sample, get_fs
from data.shards import CorruptShardError, ShardSource
from data.stage import SamplePlan
from data.videos import Videos, cut_window
from data.worker_wire import ReaderError, from_wire, identity, to_wire
from jobconfig.data import DataConfig
from jobconfig.errors import ConfigError

log = logging.getLogger(__name__)
STATE_VERSION = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Readers(IterableDataset):
    """One rank's reader; in each DataLoader worker it serves that worker's items."""

    def __init__(self, cfg: DataConfig, meta: DatasetMeta, buckets: Buckets, num_streams: int,
                 schedule: Schedule, rank: int):
        self.cfg, self.meta, self.buckets, self.num_streams = cfg, meta, buckets, num_streams
        self.schedule, self.rank = schedule, rank
        self._warned: set[str] = set()  # corrupt shards already reported by this reader
        self._orders: dict[int, tuple] = {}  # epoch -> _epoch(epoch), the last two epochs

    @property
    def videos(self) -> Videos:
        return self.buckets.videos

    def __iter__(self) -> Iterator[list[SampleRecord]]:
        """One chunk per rank-local step: this worker's records of the step (maybe none), in order.

        One item per step keeps the DataLoader's round-robin aligned (item s*n + w is worker w's
        part of step s) and costs one IPC message per step instead of one per sample."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = to_wire if info is not None else identity  # in-process: no IPC, no extra copy
        try:
            for window, records in self._records(worker, workers):
                step, chunk = window.first_step, []
                for rec in records:
                    while rec.step > step:
                        yield share(chunk)
                        step, chunk = step + 1, []
                    chunk.append(rec)
                while step < window.first_step + len(window):  # up to the window's last step
                    yield share(chunk)
                    step, chunk = step + 1, []
        except Exception as e:
            if info is None:
                raise
            # hand the error to the main process as an item and end normally: it is re-raised
            # there as itself (not wrapped), and a worker that raised delays DataLoader shutdown 5 s
            yield ReaderError(e, f"DataLoader worker {worker} of rank {self.rank}")

    def _records(self, worker: int, workers: int) -> Iterator[tuple[Window, Iterator[SampleRecord]]]:
        cfg, meta, sched = self.cfg, self.meta, self.schedule
        # a fresh filesystem object per process: s3fs sessions must not cross a fork
        fs, root = get_fs(cfg.root, {**cfg.storage_options, "skip_instance_cache": True})
        source = ShardSource(fs, root, meta, prefetch=cfg.prefetch_shards, verify=cfg.verify_sha256)
        try:
            for window in sched.windows():
                yield window, self._window_records(source, window, worker, workers)
        finally:
            source.close()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        """(shard, video index in shard) per epoch position, and the bucket streams, of one epoch."""
        if epoch not in self._orders:
            cfg, sizes, bk = self.cfg, self.videos.sizes, self.buckets
            args = (cfg.seed, epoch, self.num_streams, cfg.shuffle_buffer)
            self._orders = {e: v for e, v in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = (*epoch_order(sizes, *args), bucket_streams(sizes, bk.code, len(bk.names), *args))
        return self._orders[epoch]

    def _window_records(self, source: ShardSource, window: Window, worker: int,
                        workers: int) -> Iterator[SampleRecord]:
        """This worker's records of a window, by step (samples in slot order, then known skips).
        A sample is a video (data/videos.py). It is planned before any read when some draw of its
        recorded shape could exceed max_tokens (a planned skip is never read) or when it has several
        segments (its plan names the segments to read; the plans of a whole window are not held, so
        it is planned again once read), else once decoded. The shard needs are handed to `source`
        first, so fetching runs ahead of decoding."""
        meta, videos, sched, nb = self.meta, self.videos, self.schedule, len(self.schedule.sizes)
        N = videos.num
        steps, bks, items, skips = reader_items(window, sched.batch, sched.world_size, self.rank, worker, workers)
        # (step, epoch, p, shard, video, outcome, reads): outcome a SamplePlan, a skip reason, or None
        # (planned once decoded); reads: the flat sample indices of the segments to read
        stage, todo = self.cfg.stage, []
        for step, b, i in zip(steps.tolist(), bks.tolist(), items.tolist()):
            epoch, m = divmod(i, sched.sizes[b])
            sh, ix, streams = self._epoch(epoch)
            p = int(streams[b][m])
            shard = int(sh[p])
            v = int(videos.offsets[shard]) + int(ix[p])
            lo, hi = videos.samples(v)
            outcome, reads = None, (lo,)
            if meta.has_shapes:
                T, _, h, w = videos.shape(v)
                tokens = token_range(stage, (h, w))[1] > stage.max_tokens  # only its draw says if it fits
                if tokens or hi - lo > 1:
                    outcome = plan_or_skip(stage, self.cfg.seed, epoch, p, T, (h, w))
                if hi - lo > 1 and not isinstance(outcome, str):
                    reads = tuple(i for i, _, _ in videos.pieces(v, outcome.frame_indices, outcome.interval))
                    outcome = outcome if tokens else None
            todo.append((step, epoch, p, shard, v, outcome, reads))
        for step, k in zip(skips[0].tolist(), skips[1].tolist()):
            epoch, m = divmod(k, sched.num_skips)
            sh, ix, streams = self._epoch(epoch)
            p = int(streams[nb][m])
            shard = int(sh[p])
            v = int(videos.offsets[shard]) + int(ix[p])
            todo.append((step, epoch, p, shard, v, SKIP_CODES[int(self.buckets.code[v])], ()))
        todo.sort(key=lambda x: x[0])  # stable: a step's samples stay in slot order, before its skips
        offsets = meta.offsets
        source.extend(((epoch, shard), i - int(offsets[shard])) for _, epoch, _, shard, _, outcome, reads in todo
                      if not isinstance(outcome, str) for i in reads)
        for step, epoch, p, shard, v, outcome, reads in todo:
            rec = SampleRecord(epoch * N + p, epoch, p, meta.names[shard], step=step,
                               skip=outcome if isinstance(outcome, str) else None)
            if rec.skip is None:
                got = [(i, source.take((epoch, shard), i - int(offsets[shard]))) for i in reads]
                self._read(rec, outcome, v, got)
            yield rec

    def _read(self, rec: SampleRecord, plan: SamplePlan | None, v: int, got: list) -> None:
        """Decode the video's segments `got` ((flat sample index, what the shard source gave) each) and cut
        its planned frames, or set why it is skipped."""
        cfg, meta, videos = self.cfg, self.meta, self.videos
        bad = next((g for _, g in got if isinstance(g, CorruptShardError)), None)
        if bad is not None:
            if cfg.corrupt_shards == "fail":
                raise bad
            if rec.shard not in self._warned:
                self._warned.add(rec.shard)
                log.warning("skipping the samples of a corrupt shard (data.corrupt_shards=skip): %s", bad)
            rec.skip = SKIP_CORRUPT
            return
        parts = []
        rec.key = videos.key(v, got[0][1][0])
        try:
            for i, (key, members) in got:
                latents, _ = decode_sample(members, where=f"shard {rec.shard} sample {key}")
                recorded = meta.sample_shape(i) if meta.has_shapes else None
                if recorded is not None and list(latents.shape) != recorded:
                    raise ShardFormatError(f"shard {rec.shard} sample {key}: latents of shape "
                                           f"{list(latents.shape)}, index.json records {recorded}")
                parts.append(latents)
        except ShardFormatError as e:  # a verified shard holding an undecodable sample: the writer's bug
            if cfg.corrupt_shards == "fail":
                raise
            log.warning("skipping an undecodable sample (data.corrupt_shards=skip): %s", e)
            rec.skip = SKIP_BAD_SAMPLE
            return
        hw = tuple(parts[0].shape[-2:])
        if plan is None:  # the decoded shapes are the recorded ones (checked above), or none was recorded
            T = videos.shape(v)[0] if videos.grouped else parts[0].shape[0]
            plan = plan_or_skip(cfg.stage, cfg.seed, rec.epoch, rec.position, T, hw)
            if isinstance(plan, str):
                rec.skip = plan
                return
        rec.frame_indices, rec.interval, rec.clips = plan.frame_indices, plan.interval, plan.clips
        rec.patches = patches_per_frame(hw, cfg.stage.patch_size)
        # evenly spaced frames: a strided view of one segment in the stored dtype (a worker moves it as is:
        # bf16 is half the bytes of fp32, and collate converts while copying it into the batch), or the
        # frames of the segments a window crosses, concatenated
        rec.latents = cut_window(parts, videos.pieces(v, plan.frame_indices, plan.interval), plan.interval)


class LatentLoader:
    """Iterate `LatentBatch`es of one rank; `state_dict()` after any step resumes exactly there.

    rank / world_size: this process's data-parallel coordinates (no process group needed).
    heldout: the fraction of samples held out by key hash (data/heldout_split.py): never served.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, heldout: float = 0.0):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: got {rank}, expected 0 <= rank < world_size={world_size}")
        self.cfg, self.rank, self.world_size, self.heldout = cfg, rank, world_size, heldout
        where = f"{cfg.root}/index.json"
        fs, path = get_fs(cfg.root, cfg.storage_options)
        index = read_index(fs, path)
        self.meta = DatasetMeta.load(fs, path, index=index, where=where)
        # the index version the current epoch uses (data/growth.py: a resumed epoch keeps its own)
        self.index_version, self.columns = self.meta.version, index.get("columns")
        self._growth: Growth | None = None  # set while a resumed epoch finishes over the old shards
        self.epoch = -1                     # the epoch of the last step served (its window's)
        self.buckets = build_buckets(self.meta, cfg, where=where, heldout=heldout)
        self.num_streams = resolve_num_streams(cfg.num_streams, len(self.meta.names))
        self.cursors: tuple[int, ...] = (0,) * len(self.buckets.names)
        self.skips_reported = 0                  # known skips reported (the skip stream's cursor)
        self.stats: Counter = Counter()          # skips of this rank, by reason; plus steps/samples
        self.corrupt_shards: set[str] = set()    # names of shards skipped as corrupt (this rank)
        self._schedule()  # validates the tail rule against the dataset size now, not at first step

    @property
    def max_batch_size(self) -> int:
        """The most samples per rank one step holds (the largest bucket batch)."""
        return max(self.buckets.batch)

    # ------------------------------------------------------------ state
    def _order_fields(self) -> dict:
        return {"seed": self.cfg.seed, "shuffle_buffer": self.cfg.shuffle_buffer, "num_streams": self.num_streams,
                "epoch_tail": self.cfg.epoch_tail, "dataset": self.meta.fingerprint,
                "num_samples": self.meta.num_samples, "buckets": self.buckets.fingerprint}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "cursors": dict(zip(self.buckets.names, self.cursors)),
                "skips": self.skips_reported, "epoch": self.epoch, "index_version": self.index_version,
                "num_shards": len(self.meta.names), "columns": self.columns, **self._order_fields()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") == 1 and self.buckets.flat and not self.buckets.videos.grouped:
            # before buckets (and before videos): one cursor over the epoch order
            state = {**state, "version": STATE_VERSION, "buckets": self.buckets.fingerprint,
                     "cursors": {self.buckets.names[0]: state.get("epoch", 0) * self.meta.num_samples
                                 + state.get("offset", 0)}}
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state: version {state.get('version')!r}, expected {STATE_VERSION}"
                              + (" (a state from before shape buckets resumes only a dataset of one shape "
                                 "without recorded frame counts)" if state.get("version") == 1 else ""))
        if self._growth is not None:  # loaded before: start again from today's index
            g, self._growth = self._growth, None
            self._use(g.meta, g.version, g.columns)
        if state.get("dataset") != self.meta.fingerprint:
            self._resume_grown(state)
        for key, want in self._order_fields().items():
            if state.get(key) != want:
                same = {"dataset": "dataset (index.json)", "num_samples": "dataset (index.json)",
                        "buckets": "dataset, data.stage and eval.heldout_fraction (the samples it can use, "
                                   "and their shapes)"
                        }.get(key, f"data.{key}")
                raise ConfigError(f"loader state: {key} is {state.get(key)!r} in the checkpoint but {want!r} now; "
                                  f"the data order would differ (resume with the same {same})")
        cursors = state.get("cursors")
        if (not isinstance(cursors, dict) or sorted(cursors) != sorted(self.buckets.names)
                or any(not isinstance(c, int) or c < 0 for c in cursors.values())):
            raise ConfigError(f"loader state: cursors {cursors!r}, expected one non-negative count per shape "
                              f"bucket {list(self.buckets.names)}")
        if not isinstance(state.get("skips", 0), int) or state.get("skips", 0) < 0:
            raise ConfigError(f"loader state: skips {state.get('skips')!r}, expected a non-negative count")
        self.cursors = tuple(cursors[n] for n in self.buckets.names)
        self.skips_reported = state.get("skips", 0)
        self.epoch = state.get("epoch", -1) if isinstance(state.get("epoch", -1), int) else -1
        if self._growth is not None:
            sched = self._schedule()
            nxt = min(sched.normalize(b, c) // n for b, (c, n) in enumerate(zip(self.cursors, sched.sizes)) if n)
            self._growth = replace(self._growth, epoch=growth_epoch(state, nxt))
            log_growth(self.meta, self._growth.meta, self.index_version, self._growth.epoch)

    def _resume_grown(self, state: dict) -> None:
        """The checkpoint's dataset is an older version of today's (data/growth.py): finish its epoch over
        its own shards, then move to today's index; else refuse, naming the first differing shard."""
        where, full = f"{self.cfg.root}/index.json", self.meta
        old = grown_prefix(full, state, *get_fs(self.cfg.root, self.cfg.storage_options), where)
        self._growth = Growth(-1, full, full.version, self.columns)  # epoch set once the cursors are loaded
        self._use(old, state.get("index_version", full.version), state.get("columns"))

    def _use(self, meta: DatasetMeta, version: int, columns: dict | None) -> None:
        """Make `meta` the dataset of the epochs to come (its buckets, its streams)."""
        where = f"{self.cfg.root}/index.json"
        self.meta, self.index_version, self.columns = meta, version, columns
        self.buckets = build_buckets(meta, self.cfg, where=where, heldout=self.heldout)
        self.num_streams = resolve_num_streams(self.cfg.num_streams, len(meta.names))

    def _grow(self) -> None:
        """The resumed epoch is over: today's index from its first epoch on, every bucket from its start."""
        g, self._growth = self._growth, None
        self._use(g.meta, g.version, g.columns)
        self.cursors = tuple(g.epoch * n for n in self.buckets.sizes)
        self.skips_reported = g.epoch * self.buckets.num_known_skips

    # ------------------------------------------------------------ iteration
    def _schedule(self) -> Schedule:
        b, epochs = self.buckets, self.cfg.epochs
        if self._growth is not None:  # the resumed epoch ends the old dataset's schedule
            epochs = min(epochs or self._growth.epoch, self._growth.epoch)
        return Schedule(b.sizes, b.num_known_skips, b.batch, self.world_size, self.cursors,
                        self.cfg.epoch_tail, epochs, self.skips_reported)

    def num_steps(self) -> int | None:
        """Steps left until data.epochs is reached (the same on every rank); None when endless."""
        if self._growth is None:
            return self._schedule().num_steps()
        if not self.cfg.epochs:
            return None
        g = self._growth
        grown = build_buckets(g.meta, self.cfg, heldout=self.heldout)
        rest = Schedule(grown.sizes, grown.num_known_skips, grown.batch, self.world_size,
                        tuple(g.epoch * n for n in grown.sizes), self.cfg.epoch_tail, self.cfg.epochs,
                        g.epoch * grown.num_known_skips).num_steps() if self.cfg.epochs > g.epoch else 0
        return (self._schedule().num_steps() if g.epoch > 0 else 0) + rest  # epochs=0 would be endless

    def __iter__(self) -> Iterator[LatentBatch]:
        if self._growth is not None:
            if self._growth.epoch > 0:
                yield from self._iterate()
            if self.cfg.epochs and self.cfg.epochs <= self._growth.epoch:
                return
            self._grow()
        yield from self._iterate()

    def _iterate(self) -> Iterator[LatentBatch]:
        cfg = self.cfg
        schedule = self._schedule()
        dataset = _Readers(cfg, self.meta, self.buckets, self.num_streams, schedule, self.rank)
        if cfg.num_workers:
            records = iter(DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                                      collate_fn=identity, prefetch_factor=4))  # items are whole steps
        else:
            records = iter(dataset)
        dtype, parts, W = _DTYPES[cfg.dtype], max(1, cfg.num_workers), self.world_size
        for window in schedule.windows():
            expect = reader_items(window, schedule.batch, W, self.rank, 0, 1)
            counts = np.bincount(expect[0] - window.first_step, minlength=len(window)) \
                + np.bincount(expect[3][0] - window.first_step, minlength=len(window))
            for t in range(len(window)):
                buf = []
                for _ in range(parts):
                    chunk = next(records, None)
                    if isinstance(chunk, ReaderError):
                        del records  # shut the workers down before raising
                        raise chunk.error
                    if chunk is None:
                        raise RuntimeError(f"loader rank {self.rank}: the readers ended before step "
                                           f"{window.first_step + t}")
                    buf += from_wire(chunk)
                # samples in global-index order, then skips: the same batch whatever the worker count
                buf.sort(key=lambda r: (r.skip is not None, r.global_index))
                if len(buf) != counts[t]:
                    raise RuntimeError(f"loader rank {self.rank}: step {window.first_step + t} got {len(buf)} "
                                       f"records from its readers, expected {counts[t]}")
                batch = collate(buf, cfg.pack_tokens, dtype, moments=self.meta.moments)
                for _, _, reason in batch.skipped:
                    self.stats[f"skipped/{reason}"] += 1
                self.corrupt_shards.update(r.shard for r in buf if r.skip == SKIP_CORRUPT)
                self.stats["steps"] += 1
                self.stats["samples"] += len(buf) - len(batch.skipped)
                # before yielding: state_dict() now includes this step
                self.cursors, self.skips_reported = schedule.advance(self.cursors, window, t)
                self.epoch = window.epoch
                yield batch
