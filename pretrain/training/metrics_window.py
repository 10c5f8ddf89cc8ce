"""The metrics window: steps trained but not yet read back, and when and how they are flushed.

A step never waits for the device: its loss and grad norm stay device
tensors, its token, attention-pair and sample counts and its sample rows are
host numbers (from the loader's clip sizes), and so are, for a blend of
datasets (data/blend.py), its samples per dataset (`source_samples`). The window holds those records
and reads them back in one batch on flush steps only: every
`train.log_every` steps, the first and last step of a run, and before a
checkpoint (so metrics.jsonl holds every step a checkpoint covers). A flush
makes one all-reduce, one all_gather_object and one device-to-host copy,
then writes one metrics.jsonl line per step. Step time, tokens/s and MFU on a
line are averages over the flushed window, timed up to that sync: per-step
host timing would measure only kernel launches on an asynchronous device.

A flushed window whose samples the loader mostly skipped stops the run
(`skipped_window_error`): a run that goes on would train on nothing.

metrics.jsonl is keyed by step; a resumed run first drops the lines of the
steps it trains again (`keep_metrics_upto`), so no step is recorded twice.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from data.buckets import SKIP_HELDOUT
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from pretrain.checkpoint.integrity import atomic_write
from pretrain.training.metric_sinks import MetricSinks
from pretrain.training.metrics import train_flops

log = logging.getLogger(__name__)
EVAL_KEYS = ("heldout_", "eval_time_share")  # prefixes of a step's held-out results (host numbers)


class MetricsWindow:
    """The records of the steps since the last flush, on every rank; the flushed ones in `history`.

    `progress_line(record, mfu, eta)` formats a console line (the Trainer's, which a subclass may
    change); `sinks` receive the flushed records on rank 0."""

    def __init__(self, cfg: JobConfig, sinks: MetricSinks, device: torch.device, rank: int, world_size: int,
                 dp: int, n_params: int, peak_flops: float | None,
                 progress_line: Callable[[dict, str, float], str]):
        self.cfg, self.sinks, self.device = cfg, sinks, device
        self.rank, self.world_size, self.dp = rank, world_size, dp
        self.n_params, self.peak_flops, self.progress_line = n_params, peak_flops, progress_line
        self.history: list[dict[str, Any]] = []  # flushed records, one per step
        self._pending: list[dict[str, Any]] = []  # steps trained but not yet read back (device tensors)
        self._start = time.perf_counter()

    def add(self, record: dict[str, Any]) -> None:
        self._pending.append(record)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent since the window started (a held-out evaluation) out of its time."""
        self._start += seconds

    def restart_clock(self) -> None:
        """The window's time starts now (what came before, a checkpoint's stall, is not training time)."""
        self._start = time.perf_counter()

    def log_due(self, step: int, start_step: int) -> bool:
        """Steps the console shows: every `train.log_every`-th, the run's first and its last."""
        tc = self.cfg.train
        return step % tc.log_every == 0 or step == tc.steps or step == start_step + 1

    def flush_due(self, step: int, start_step: int, checkpoint: bool) -> bool:
        return checkpoint or self.log_due(step, start_step)

    def flush(self, start_step: int, start_time: float) -> None:
        """Read the pending steps back and record them (every rank calls: collective)."""
        self.record(self.read_back(), start_step, start_time)

    def read_back(self) -> list[dict[str, Any]]:
        """The pending steps' records with every value a host number, summed over the data-parallel
        replicas: one all-reduce, one all_gather_object and one device-to-host read for all of them.
        ConfigError when the loader skipped too much of the window."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        dev = self.device
        losses = torch.stack([p["loss"].to(dev, torch.float64).reshape(()) for p in pending])
        counts = torch.tensor([[p["tokens"], p["samples"], p["attention_pairs"]] for p in pending],
                              dtype=torch.float64, device=dev)
        stats = torch.cat([losses[:, None], counts], dim=1)
        dist.all_reduce(stats)
        # DeepSpeed reports the global grad norm (the same on every rank): kept local, read in the same copy
        norms = torch.stack([_as_tensor(p["grad_norm"], dev) for p in pending])
        values = torch.cat([stats.flatten(), norms]).tolist()  # the one device-to-host sync
        consumed: list = [None] * self.world_size
        dist.all_gather_object(consumed, [(p["sample_rows"], p.get("skipped", []), p.get("source_samples"))
                                          for p in pending])
        # every rank of one data-parallel replica (its TP and SP ranks) trains the same rows
        replicas = self.world_size // self.dp
        n = len(pending)
        out = []
        for i, p in enumerate(pending):
            loss, tokens, samples, pairs = values[4 * i: 4 * i + 4]
            out.append({"step": p["step"], "loss": loss / self.world_size, "tokens": tokens / replicas,
                        "samples": samples / replicas, "attention_pairs": pairs / replicas,
                        "grad_norm": values[4 * n + i], "lr": p["lr"],
                        "sample_rows": sorted({r for rank_rows in consumed for r in rank_rows[i][0]})})
            out[-1].update({k: v for k, v in p.items() if k.startswith(EVAL_KEYS)})  # host floats
            if p.get("source_samples"):  # a blend (data/blend.py): samples per dataset, summed like "samples"
                drawn = Counter()
                for rank_rows in consumed:
                    drawn.update(rank_rows[i][2] or {})
                out[-1]["source_samples"] = {k: v // replicas for k, v in drawn.items()}
        reasons = [reason for rank_rows in consumed for _, rank_reasons, _ in rank_rows for reason in rank_reasons]
        if problem := skipped_window_error(out, reasons, replicas, self.cfg.train.max_skipped_fraction):
            raise ConfigError(problem)
        return out

    def record(self, records: list[dict], start_step: int, start_time: float) -> None:
        """Log flushed records: throughput and MFU are the window's (since the last flush), timed
        after the flush's sync; one metrics.jsonl line per step; the console on log steps."""
        if not records:
            return
        tc = self.cfg.train
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        self._start = now
        tokens = sum(m["tokens"] for m in records)
        samples = sum(m["samples"] for m in records)
        flops = sum(train_flops(self.cfg.model, self.n_params, m["tokens"], m["attention_pairs"]) for m in records)
        peak = self.peak_flops
        for m in records:
            m["step_time"] = elapsed / len(records)
            m["tokens_per_s"] = tokens / elapsed
            m["samples_per_s"] = samples / elapsed
            if peak:
                m["mfu"] = flops / elapsed / (peak * self.world_size)
        self.history.extend(records)
        if self.rank != 0:
            return
        self.sinks.write(records)
        for m in records:
            if self.log_due(m["step"], start_step):
                done = m["step"] - start_step
                eta = (tc.steps - m["step"]) * (now - start_time) / done
                mfu = f"  MFU {m['mfu'] * 100:.1f}%" if "mfu" in m else ""
                log.info(self.progress_line(m, mfu, eta))


def keep_metrics_upto(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` from the metrics file at `path` (they are trained again),
    so a resumed run never holds two records of one step. Rank 0; atomic."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(kept))


def skipped_window_error(records: list[dict], reasons: list[str], replicas: int, limit: float) -> str | None:
    """Why a flushed window must stop the run, or None: the loader skipped more than `limit` of its
    samples (videos too short for the stage, corrupt shards, too many tokens), and a run that goes on
    trains on nothing. `reasons` are the skip reasons gathered from every rank (each data-parallel
    replica counted `replicas` times, once per TP/SP rank); every rank reaches the same verdict. Samples
    of the held-out split are left out of both counts: they are skipped by design."""
    reasons = [r for r in reasons if r != SKIP_HELDOUT]
    skipped = len(reasons) / replicas
    total = skipped + sum(m["samples"] for m in records)
    if not total or skipped / total <= limit:
        return None
    counts = ", ".join(f"{k}: {int(v / replicas)}" for k, v in sorted(Counter(reasons).items()))
    return (f"data: {int(skipped)} of {int(total)} samples of steps {records[0]['step']}..{records[-1]['step']} "
            f"were skipped ({counts}), over train.max_skipped_fraction={limit}; check data.stage (frames, "
            "interval, max_tokens) against the dataset")


def _as_tensor(value, device) -> torch.Tensor:
    """A grad norm as DeepSpeed reports it (a tensor, a float or None) as a 0-d float64 tensor on
    `device`, without reading a device tensor back."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, torch.float64).reshape(())
    return torch.tensor(float("nan") if value is None else float(value), dtype=torch.float64, device=device)
