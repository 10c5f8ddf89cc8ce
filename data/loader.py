"""Streaming latent loader with exact resume, across ranks, workers and world sizes.

Data order is a pure function of (seed, epoch, global position) (data/order.py):
the global stream of samples is fixed by the seed and the dataset alone.
Global step s serves G = world_size * batch_size consecutive positions of it;
rank r takes slots r, r+W, r+2W, ... of the step; worker w of a rank's
DataLoader takes the rank's samples j with j % num_workers == w and the
DataLoader hands them back round-robin, so the rank sees them in order.
Per-sample randomness (start frame, interval, clip cuts; data/stage.py) comes
from an RNG seeded by (seed, epoch, position).

State (`state_dict`) is the cursor (epoch, offset of the next unconsumed
position) plus what defines the order (seed, shuffle buffer, streams, tail
rule, dataset fingerprint), checked on `load_state_dict`. It does not depend
on the world size, batch size or worker count: resume on any number of ranks
serves exactly the positions an uninterrupted run would have served next.
The state is counted in the main process from the steps *handed out*, so
samples prefetched by workers but not consumed are served again after resume.

Every position yields exactly one record on exactly one rank, a sample or a
counted skip (video too short for the stage, too many tokens, corrupt shard or
undecodable sample under data.corrupt_shards='skip'; 'fail' raises instead,
naming the shard), and every rank takes the same number of steps (a step
is G positions, whatever is skipped): no end-of-epoch hang with uneven shards.
A step whose positions were all skipped on a rank is a 0-row batch for that
rank (the trainer runs it as a zero-loss step, still joining collectives).

Epoch tail (data.epoch_tail), the drop/pad rule: 'roll' (default) never drops
and never pads: the step that reaches the end of epoch e is completed with the
first positions of epoch e+1's order (which epoch e+1 then does not serve
again), so every sample of every epoch is served exactly once, an epoch takes
about N / G steps, and with data.epochs = E the run is ceil((E*N - start) / G)
steps. 'drop' keeps steps inside epochs: the last N mod G positions of each
epoch's order are not served in that epoch (the same positions on every rank,
a different set each epoch since the order is reshuffled).

Workers: DataLoader worker w of n reads the rank's samples j with j % n == w
(so with S streams and n*W dividing S, each worker reads its own shards) and
sends one message per step with its part of the step (latents as pickled
bytes, cheaper here than torch's shared-memory tensors); the main process
merges the parts of a step and collates the batch.
"""
from __future__ import annotations

import logging
import pickle
import traceback
from collections import Counter
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import patches_per_frame
from data.batching import LatentBatch, SampleRecord, collate, copy_serial, numpy_view
from data.order import Cursor, DatasetMeta, Schedule, epoch_order, resolve_num_streams
from data.shard_format import ShardFormatError, decode_sample, get_fs, read_index
from data.shards import CorruptShardError, ShardSource
from data.stage import SKIP_SHORT, SKIP_TOKENS, plan_sample, sample_rng, sample_tokens
from jobconfig.data import DataConfig
from jobconfig.errors import ConfigError

log = logging.getLogger(__name__)
STATE_VERSION = 1
SKIP_CORRUPT = "corrupt_shard"
SKIP_BAD_SAMPLE = "corrupt_sample"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _identity(x):
    return x


class _Wire(NamedTuple):
    """A sample's latents between processes: numpy bytes (same-size ints) plus the torch dtype name."""
    array: np.ndarray
    dtype: str


def _to_wire(chunk: list[SampleRecord]) -> list[SampleRecord]:
    """Worker side: latents as contiguous numpy arrays. They travel pickled through the worker's
    pipe: measured here, moving a fresh torch tensor into shared memory costs ~8 ms per step,
    pickling the same bytes ~0.05 ms. Copies use numpy (see batching.copy_serial)."""
    for r in chunk:
        if isinstance(r.latents, torch.Tensor):
            x = torch.empty(r.latents.shape, dtype=r.latents.dtype)
            copy_serial(x, r.latents)
            r.latents = _Wire(numpy_view(x), str(x.dtype).split(".")[-1])
    return chunk


def _from_wire(chunk: list[SampleRecord]) -> list[SampleRecord]:
    for r in chunk:
        if isinstance(r.latents, _Wire):
            r.latents = torch.from_numpy(r.latents.array).view(getattr(torch, r.latents.dtype))
    return chunk


class _ReaderError:
    """An exception of a worker, carried to the main process as a plain item."""

    def __init__(self, error: Exception, where: str):
        error.add_note(f"(raised in {where}:)\n{traceback.format_exc()}")
        try:
            pickle.dumps(error)
        except Exception:  # an unpicklable error would be lost between processes: send its text
            error = RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        self.error = error


class _Readers(IterableDataset):
    """One rank's reader; in each DataLoader worker it serves that worker's positions."""

    def __init__(self, cfg: DataConfig, meta: DatasetMeta, num_streams: int, schedule: Schedule, rank: int):
        self.cfg, self.meta, self.num_streams, self.schedule, self.rank = cfg, meta, num_streams, schedule, rank
        self._warned: set[str] = set()  # corrupt shards already reported by this reader

    def __iter__(self) -> Iterator[list[SampleRecord]]:
        """One chunk per rank-local step: this worker's records of the step (maybe none), in order.

        One item per step keeps the DataLoader's round-robin aligned (item s*n + w is worker w's
        part of step s) and costs one IPC message per step instead of one per sample."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        B, total = self.cfg.batch_size, self.schedule.num_steps()
        share = _to_wire if info is not None else _identity  # in-process: no IPC, no extra copy
        step, chunk = 0, []
        try:
            for rec in self._records(worker, workers):
                while rec.local_index // B > step:
                    yield share(chunk)
                    step, chunk = step + 1, []
                chunk.append(rec)
        except Exception as e:
            if info is None:
                raise
            # hand the error to the main process as an item and end normally: it is re-raised
            # there as itself (not wrapped), and a worker that raised delays DataLoader shutdown 5 s
            yield _ReaderError(e, f"DataLoader worker {worker} of rank {self.rank}")
            return
        while total is not None and step < total:  # trailing steps this worker has no sample in
            yield share(chunk)
            step, chunk = step + 1, []

    def _records(self, worker: int, workers: int) -> Iterator[SampleRecord]:
        cfg, meta = self.cfg, self.meta
        # a fresh filesystem object per process: s3fs sessions must not cross a fork
        fs, root = get_fs(cfg.root, {**cfg.storage_options, "skip_instance_cache": True})
        source = ShardSource(fs, root, meta, prefetch=cfg.prefetch_shards, verify=cfg.verify_sha256)
        N = meta.num_samples
        try:
            for epoch, ps, js in self.schedule.reader_positions(self.rank, worker, workers):
                shard_of, idx_of = epoch_order(meta.sizes, cfg.seed, epoch, self.num_streams, cfg.shuffle_buffer)
                shards, idxs = shard_of[ps].tolist(), idx_of[ps].tolist()
                source.begin_epoch(zip(shards, idxs))
                for p, j, shard, idx in zip(ps.tolist(), js.tolist(), shards, idxs):
                    rec = self._record(source.take(shard, idx), epoch, p, shard, N)
                    rec.local_index = j
                    yield rec
        finally:
            source.close()

    def _record(self, got, epoch: int, p: int, shard: int, N: int) -> SampleRecord:
        cfg = self.cfg
        rec = SampleRecord(epoch * N + p, epoch, p, self.meta.names[shard])
        if isinstance(got, CorruptShardError):
            if cfg.corrupt_shards == "fail":
                raise got
            if rec.shard not in self._warned:
                self._warned.add(rec.shard)
                log.warning("skipping the samples of a corrupt shard (data.corrupt_shards=skip): %s", got)
            rec.skip = SKIP_CORRUPT
            return rec
        rec.key, members = got
        try:
            latents, _ = decode_sample(members, where=f"shard {rec.shard} sample {rec.key}")
        except ShardFormatError as e:  # a verified shard holding an undecodable sample: the writer's bug
            if cfg.corrupt_shards == "fail":
                raise
            log.warning("skipping an undecodable sample (data.corrupt_shards=skip): %s", e)
            rec.skip = SKIP_BAD_SAMPLE
            return rec
        plan = plan_sample(cfg.stage, latents.shape[0], sample_rng(cfg.seed, epoch, p))
        if plan is None:
            rec.skip = SKIP_SHORT
            return rec
        rec.patches = patches_per_frame(tuple(latents.shape[-2:]), cfg.stage.patch_size)
        if sample_tokens(cfg.stage, plan.clips, tuple(latents.shape[-2:])) > cfg.stage.max_tokens:
            rec.skip = SKIP_TOKENS
            return rec
        # evenly spaced frames: a strided view in the stored dtype; a worker moves it as is (bf16 is
        # half the bytes of fp32) and collate converts while copying it into the batch
        f = plan.frame_indices
        rec.latents = latents[f[0]:f[-1] + 1:plan.interval]
        rec.frame_indices, rec.interval, rec.clips = plan.frame_indices, plan.interval, plan.clips
        return rec


class LatentLoader:
    """Iterate `LatentBatch`es of one rank; `state_dict()` after any step resumes exactly there.

    rank / world_size: this process's data-parallel coordinates (no process group needed).
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: got {rank}, expected 0 <= rank < world_size={world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        fs, root = get_fs(cfg.root, cfg.storage_options)
        self.meta = DatasetMeta.from_index(read_index(fs, root), where=f"{cfg.root}/index.json")
        self.num_streams = resolve_num_streams(cfg.num_streams, len(self.meta.names))
        self.cursor = Cursor()
        self.stats: Counter = Counter()          # skips of this rank, by reason; plus steps/samples
        self.corrupt_shards: set[str] = set()    # names of shards skipped as corrupt (this rank)
        self._schedule()  # validates the tail rule against the dataset size now, not at first step

    # ------------------------------------------------------------ state
    def _order_fields(self) -> dict:
        return {"seed": self.cfg.seed, "shuffle_buffer": self.cfg.shuffle_buffer, "num_streams": self.num_streams,
                "epoch_tail": self.cfg.epoch_tail, "dataset": self.meta.fingerprint,
                "num_samples": self.meta.num_samples}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.cursor.epoch, "offset": self.cursor.offset,
                **self._order_fields()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state: version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, want in self._order_fields().items():
            if state.get(key) != want:
                same = "dataset (index.json)" if key in ("dataset", "num_samples") else f"data.{key}"
                raise ConfigError(f"loader state: {key} is {state.get(key)!r} in the checkpoint but {want!r} now; "
                                  f"the data order would differ (resume with the same {same})")
        if not 0 <= state["offset"] <= self.meta.num_samples or state["epoch"] < 0:  # drop: may sit at N
            raise ConfigError(f"loader state: cursor ({state['epoch']}, {state['offset']}) out of range")
        self.cursor = Cursor(int(state["epoch"]), int(state["offset"]))

    # ------------------------------------------------------------ iteration
    def _schedule(self) -> Schedule:
        return Schedule(self.meta.num_samples, self.world_size, self.cfg.batch_size, self.cursor,
                        self.cfg.epoch_tail, self.cfg.epochs)

    def num_steps(self) -> int | None:
        """Steps left until data.epochs is reached (the same on every rank); None when endless."""
        return self._schedule().num_steps()

    def __iter__(self) -> Iterator[LatentBatch]:
        cfg = self.cfg
        schedule = self._schedule()
        dataset = _Readers(cfg, self.meta, self.num_streams, schedule, self.rank)
        if cfg.num_workers:
            records = iter(DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                                      collate_fn=_identity, prefetch_factor=4))  # items are whole steps
        else:
            records = iter(dataset)
        dtype, parts, done = _DTYPES[cfg.dtype], max(1, cfg.num_workers), 0
        chunks: list[list[SampleRecord]] = []
        for chunk in records:
            if isinstance(chunk, _ReaderError):
                del records  # shut the workers down before raising
                raise chunk.error
            chunks.append(_from_wire(chunk))
            if len(chunks) < parts:
                continue
            buf = sorted((r for c in chunks for r in c), key=lambda r: r.local_index)
            chunks = []
            if len(buf) != cfg.batch_size:
                raise RuntimeError(f"loader rank {self.rank}: step {done} got {len(buf)} samples from its "
                                   f"readers, expected {cfg.batch_size}")
            batch = collate(buf, cfg.pack_tokens, dtype)
            for _, _, reason in batch.skipped:
                self.stats[f"skipped/{reason}"] += 1
            self.corrupt_shards.update(r.shard for r in buf if r.skip == SKIP_CORRUPT)
            self.stats["steps"] += 1
            self.stats["samples"] += len(buf) - len(batch.skipped)
            done += 1
            self.cursor = schedule.cursor_after(done)  # before yielding: state_dict() now includes this step
            yield batch
        if chunks:
            raise RuntimeError(f"loader rank {self.rank}: {len(chunks)} reader chunks left over, expected whole steps")
