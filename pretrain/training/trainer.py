"""One Trainer for all four curriculum stages; stages differ by config only.

Each step: this rank's rows of the global batch (a pure function of the step,
so resume and world-size changes are exact), per-row noise seeds from the
global sample index, the next-clip loss through the DeepSpeed engine, logs
(loss, tokens/s, samples/s, step time, grad norm, LR, MFU on GPU) to the
console (parallel/logs.py) and to metrics.jsonl, TensorBoard and W&B
(metric_sinks.py), checkpoints through the one CheckpointManager (in the
background with `train.async_checkpoint`), and at the end the export directory
(`from_pretrained`) that the next stage starts from.

A step never waits for the device: its loss and grad norm stay device
tensors, its token, attention-pair and sample counts and its sample rows are
host numbers (from the loader's clip sizes). They are read back in one
batch on flush steps only: every `train.log_every` steps, the first and last
step of a run, and before a checkpoint (so metrics.jsonl holds every step a
checkpoint covers). A flush makes one all-reduce, one all_gather_object and
one device-to-host copy, then writes one metrics.jsonl line per step as
before. Step time, tokens/s and MFU on a line are averages over the flushed
window, timed up to that sync: per-step host timing would measure only
kernel launches on an asynchronous device.

The model stays the plain single-device VideoGPT (`self.model`); the engine
wraps it for forward/backward/step; nothing unwraps `.module`.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from data.batch import patches_per_frame, sequence_length
from data.sources import make_source
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.secrets import redact
from parallel import logs
from parallel.device import DistInfo, init_process_group, select_device
from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
from parallel.engine import build_engine, gather_full_state_dict
from pretrain.checkpoint.export import export_path, load_export, save_export, weights_fingerprint
from pretrain.checkpoint.integrity import CheckpointError, atomic_write
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.model.videogpt import build_model
from pretrain.training.metric_sinks import MetricSinks
from pretrain.training.metrics import allowed_attention_pairs, peak_flops, train_flops
from pretrain.training.objective import next_clip_loss, row_seed
from pretrain.training.optimizer import build_optimizer, build_scheduler
from pretrain.training.parallelize import TP_PLAN, parallelize

log = logging.getLogger(__name__)

RESUME_MODES = "auto (newest checkpoint that verifies) | none (fresh, into an out_dir without checkpoints) | " \
               "fresh (fresh; an earlier run's checkpoints and metrics are moved aside first) | a checkpoint path"


class ResumeRefused(CheckpointError, ConfigError):
    """Starting would lose (or silently redo) an earlier run; nothing was changed. A ConfigError, so the
    command line reports it as one line `vgpt train: ...` with exit status 2."""


@dataclass
class TrainerHooks:
    """Calls the Trainer makes at fixed points, for tooling outside the training code
    (fault injection, orchestration/faults.py). Each is optional."""
    after_step: Callable[["Trainer"], None] | None = None       # after a step is recorded (and saved)
    before_checkpoint_commit: Callable[[int], None] | None = None  # rank 0, files written, manifest not yet


class Trainer:
    def __init__(self, cfg: JobConfig, stage_name: str = "stage", data_factory: Callable | None = None,
                 hooks: TrainerHooks | None = None):
        self.cfg, self.stage_name = cfg, stage_name
        self.hooks = hooks or TrainerHooks()
        pc = cfg.parallel
        self.device = select_device(pc.device).activate()  # sets DS_ACCELERATOR before deepspeed imports
        self.dist: DistInfo = init_process_group(self.device)
        logs.setup(rank=self.dist.rank)
        self.dims = ParallelDims.from_config(pc, self.dist.world_size, cfg.model)
        self.groups = build_process_groups(self.dims) if self.dims.tp * self.dims.sp > 1 else None
        self.dp_rank = self.groups.dp_rank if self.groups else self.dist.rank
        self.dp_size = self.dims.dp
        self.out = Path(cfg.train.out_dir)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, device=self.device.device, seed=cfg.train.seed)
        # the full model's parameters, counted before TP shards them or ZeRO-3 partitions them (MFU)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        if cfg.train.init_from:
            load_export(self.model, cfg.train.init_from)
            self._record_init(cfg.train.init_from)
        parallelize(self.model, pc, self.groups, compile=cfg.train.compile)
        self.data = (data_factory or make_source)(cfg, self.dp_rank, self.dp_size)
        # with SP, DeepSpeed averages gradients over dp x sp ranks (each SP rank holds the full loss)
        mpu = self.groups.deepspeed_mpu() if self.groups else None
        grad_ranks = mpu.get_data_parallel_world_size() if mpu else self.dist.world_size
        # the reference's warmup advances once per process per optimiser step: all ranks count, SP and TP too
        self.engine = build_engine(self.model, pc, cfg.train, grad_ranks,
                                   make_optimizer=lambda params: build_optimizer(params, cfg.train),
                                   make_scheduler=lambda opt: build_scheduler(opt, cfg.train, self.dist.world_size),
                                   mpu=mpu, micro_batch=self.rows_per_micro(), device_type=self.device.type)
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.dist.rank, cfg.train.keep_last,
                                      cfg.train.keep_every, before_commit=self.hooks.before_checkpoint_commit)
        self.step = 0
        self.history: list[dict[str, Any]] = []  # flushed records, one per step
        self._pending: list[dict[str, Any]] = []  # steps trained but not yet read back (device tensors)
        self._window_start = time.perf_counter()
        self.sinks = MetricSinks(self.out, self.stage_name, cfg.train, redact(asdict(cfg)))
        self.peak_flops = peak_flops(self.device.device)  # per device, for MFU (None: unknown device)

    def _record_init(self, path: str) -> None:
        """Which weights this stage starts from, for the run's provenance (and the chaining test)."""
        fp = weights_fingerprint(self.model.state_dict())
        self._log_line(f"{self.stage_name}: initialised from {path} (weights {fp[:12]})")
        if self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "init.json").write_text(json.dumps({"init_from": str(path), "weights_sha256": fp}))

    def rows_per_micro(self) -> int:
        return self.data.rows_per_micro

    # ------------------------------------------------------------ state
    def global_batch(self) -> int:
        tc = self.cfg.train
        return self.rows_per_micro() * tc.grad_accum_steps * self.dp_size

    def parallel_layout(self) -> dict[str, Any]:
        """The parallel layout of this run, as checkpoints record it (pretrain/checkpoint/manager.py)."""
        pc = self.cfg.parallel
        out = {"world_size": self.dist.world_size, "dp": self.dims.dp, "tp": self.dims.tp,
               "sp": self.dims.sp, "zero_stage": pc.zero_stage, "precision": pc.precision}
        if self.dims.tp > 1:
            out["tp_plan"] = TP_PLAN  # how offline tools merge the TP shards
        return out

    def trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage_name, "step": self.step, "world_size": self.dist.world_size,
                "consumed_samples": self.step * self.global_batch(),
                "global_batch": self.global_batch(), "layout": self.parallel_layout(),
                "loader": self.data.state_dict(), "config": redact(asdict(self.cfg))}

    def resume(self, mode: str) -> bool:
        """`auto`: the newest checkpoint that verifies; with checkpoints none of which verifies it stops
        (ResumeRefused) instead of starting over on top of them. `none`: fresh, refused when the out_dir
        already holds checkpoints. `fresh`: fresh, an earlier run's checkpoints, metrics, TensorBoard
        logs and export moved aside into `<out_dir>/replaced-<time>/` first. A path: that checkpoint.
        Never deletes a checkpoint; metrics.jsonl keeps only the steps up to the one resumed from."""
        root = self.ckpt.root
        if mode in ("none", "fresh"):
            tags = self.ckpt.tags() if self._earlier_run() else []
            if tags and mode == "none":
                raise ResumeRefused(f"--resume none: {root} already holds checkpoints "
                                    f"({_span(tags)}) that a fresh start would overwrite; nothing was changed. "
                                    "Resume them (--resume auto), give another --train.out_dir, or --resume fresh "
                                    "to move them aside and start over")
            if tags:  # --resume fresh
                self._barrier()  # every rank has looked before rank 0 moves anything
                if self.dist.rank == 0:
                    self._log_line(f"--resume fresh: moved the earlier run ({_span(tags)}) to {self._set_aside()}")
                self._barrier()
            self._keep_metrics_upto(0)
            return False
        if mode == "auto":
            # every rank hashes a share of the files; all learn the verdict
            ckpt, skipped = self.ckpt.newest_verified(collective=True)
            if ckpt is None and skipped and self._earlier_run():
                raise ResumeRefused(
                    f"--resume auto: none of the {len(skipped)} checkpoint(s) under {root} verifies, and starting "
                    "over would overwrite them; nothing was changed. "
                    + " | ".join(f"{p.name}: {'; '.join(found)}" for p, found in skipped)
                    + ". Repair or resume one (--resume PATH), or --resume fresh to move them aside and start over")
            for bad, found in skipped:
                msg = (f"checkpoint {bad} is not usable, falling back to an older one: " if ckpt else
                       f"checkpoint {bad} is the leftover of a save killed before any was committed, starting "
                       "over: ") + "; ".join(found)
                warnings.warn(msg, stacklevel=2)
            if ckpt is None:
                self._keep_metrics_upto(0)  # steps of a run killed before its first checkpoint are redone
                return False
        else:
            ckpt = Path(mode)
            if problems := self.ckpt.problems(ckpt, collective=True):  # never unpickle unverified
                raise CheckpointError(f"--resume {ckpt}: not a complete checkpoint: " + "; ".join(problems))
        tp_rank = self.groups.tp_rank if self.groups else 0
        state = self.ckpt.load(self.engine, ckpt, model=self.model, layout=self.parallel_layout(), tp_rank=tp_rank,
                               tp_size=self.dims.tp, log=self._log_line)
        self.step = int(state["step"])
        self.data.load_state_dict(state["loader"])
        if state.get("global_batch", self.global_batch()) != self.global_batch():
            msg = (f"global batch changed on resume: {state['global_batch']} rows per step in {ckpt}, "
                   f"{self.global_batch()} now; steps after {self.step} see other rows than the original run would")
            warnings.warn(msg, stacklevel=2)
            self._log_line(msg)
        self._keep_metrics_upto(self.step)
        self._log_line(f"resumed {self.stage_name} from {ckpt} at step {self.step}")
        return True

    def _earlier_run(self) -> bool:
        """Whether the checkpoint root holds a run that committed a checkpoint (`latest` or a manifest
        exists), as opposed to nothing or only the leftover of a first save killed before its commit."""
        store = self.ckpt.store
        return store.latest() is not None or any(store.is_complete(t) for t in store.tags())

    def _keep_metrics_upto(self, step: int) -> None:
        """metrics.jsonl is keyed by step: drop the lines of steps after `step` (they are trained again),
        so a resumed run never holds two records of one step. Rank 0; atomic."""
        path = self.out / "metrics.jsonl"
        if self.dist.rank != 0 or not path.is_file():
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

    def _set_aside(self) -> Path:
        """Move an earlier run's checkpoints, metrics, TensorBoard logs and export out of the way (rank 0)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.out / f"replaced-{stamp}", 1
        while dest.exists():
            n += 1
            dest = self.out / f"replaced-{stamp}-{n}"
        dest.mkdir(parents=True)
        for name in ("checkpoints", "metrics.jsonl", "tensorboard", "export"):
            if (self.out / name).exists():
                os.replace(self.out / name, dest / name)
        return dest

    # ------------------------------------------------------------ loop
    def _barrier(self):
        dist.barrier()

    def train_step(self) -> dict[str, Any]:
        """One optimiser step. Returns its record without a device sync: `loss` and `grad_norm`
        may be device tensors, the rest host numbers; `_flush` reads them back."""
        tc = self.cfg.train
        lr = self.engine.get_lr()[0]  # the LR this step trains with (engine.step moves the schedule on)
        loss_sum: torch.Tensor | None = None
        tokens, pairs, step_rows, skipped = 0, 0, [], []
        for micro in range(tc.grad_accum_steps):
            batch, global_rows = self.data.batch(self.step, micro)
            batch = batch.to(self.device.device)
            if not batch.clips:
                # every sample of this rank's share was skipped: a zero-weight step that still
                # runs forward/backward, so the collectives of the other ranks are joined
                batch, global_rows, weight = self.data.placeholder(), [], 0.0
            else:
                weight = 1.0
            seeds = [row_seed(tc.seed, g) for g in global_rows] or [0]
            loss = weight * next_clip_loss(self.model, batch, self.cfg.objective, seeds, forward=self.engine)
            self.engine.backward(loss)
            self.engine.step()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss  # stays on the device
            if global_rows:  # counted from the clip sizes (host ints): the objective already built the tables
                patches = patches_per_frame(tuple(batch.latents.shape[-2:]), self.cfg.model.patch_size)
                tokens += sum(sequence_length(row, patches) for row in batch.clips)
                pairs += sum(allowed_attention_pairs(row, patches) for row in batch.clips)
            step_rows += list(global_rows)
            skipped += [reason for _, _, reason in getattr(batch, "skipped", [])]  # host data of the loader
        self.step += 1
        return {"step": self.step, "loss": loss_sum / tc.grad_accum_steps, "tokens": tokens, "samples": len(step_rows),
                "attention_pairs": pairs, "grad_norm": self.engine.get_global_grad_norm(), "lr": lr,
                "sample_rows": step_rows, "skipped": skipped}

    def _log_due(self, step: int, start_step: int) -> bool:
        """Steps the console shows: every `train.log_every`-th, the run's first and its last."""
        tc = self.cfg.train
        return step % tc.log_every == 0 or step == tc.steps or step == start_step + 1

    def _flush_due(self, start_step: int, checkpoint: bool) -> bool:
        return checkpoint or self._log_due(self.step, start_step)

    def _flush(self) -> list[dict[str, Any]]:
        """The pending steps' records with every value a host number, summed over the data-parallel
        replicas: one all-reduce, one all_gather_object and one device-to-host read for all of them."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        dev = self.device.device
        losses = torch.stack([p["loss"].to(dev, torch.float64).reshape(()) for p in pending])
        counts = torch.tensor([[p["tokens"], p["samples"], p["attention_pairs"]] for p in pending],
                              dtype=torch.float64, device=dev)
        stats = torch.cat([losses[:, None], counts], dim=1)
        dist.all_reduce(stats)
        # DeepSpeed reports the global grad norm (the same on every rank): kept local, read in the same copy
        norms = torch.stack([_as_tensor(p["grad_norm"], dev) for p in pending])
        values = torch.cat([stats.flatten(), norms]).tolist()  # the one device-to-host sync
        consumed: list = [None] * self.dist.world_size
        dist.all_gather_object(consumed, [(p["sample_rows"], p.get("skipped", [])) for p in pending])
        # every rank of one data-parallel replica (its TP and SP ranks) trains the same rows
        replicas = self.dist.world_size // self.dims.dp
        n = len(pending)
        out = []
        for i, p in enumerate(pending):
            loss, tokens, samples, pairs = values[4 * i: 4 * i + 4]
            out.append({"step": p["step"], "loss": loss / self.dist.world_size, "tokens": tokens / replicas,
                        "samples": samples / replicas, "attention_pairs": pairs / replicas,
                        "grad_norm": values[4 * n + i], "lr": p["lr"],
                        "sample_rows": sorted({r for rank_rows in consumed for r in rank_rows[i][0]})})
        reasons = [reason for rank_rows in consumed for _, rank_reasons in rank_rows for reason in rank_reasons]
        if problem := skipped_window_error(out, reasons, replicas, self.cfg.train.max_skipped_fraction):
            raise ConfigError(problem)
        return out

    def run(self, resume: str = "auto") -> Path:
        """Train to `train.steps`, checkpointing; returns the path of the final export."""
        tc = self.cfg.train
        resumed = self.resume(resume)
        start_step, start_time = self.step, time.perf_counter()
        self._log_line(f"{self.stage_name}: {self.n_params / 1e6:.2f}M parameters, world size {self.dist.world_size}, "
                       f"ZeRO-{self.cfg.parallel.zero_stage}, steps {self.step + 1}..{tc.steps}")
        self._window_start = time.perf_counter()
        while self.step < tc.steps:
            self._pending.append(self.train_step())
            checkpoint = bool(tc.checkpoint_every) and self.step % tc.checkpoint_every == 0 and self.step < tc.steps
            if self._flush_due(start_step, checkpoint):
                self._record(self._flush(), start_step, start_time)
            if checkpoint:
                self._save(background=self.async_checkpoint)
                self._window_start = time.perf_counter()  # the save's stall is not training time
            if self.hooks.after_step:
                self.hooks.after_step(self)
        if not resumed or self.step > start_step:  # else we resumed from this very step's checkpoint
            self._save(background=self.async_checkpoint)  # committed in the background while we export
        export = export_path(self.out)
        full = gather_full_state_dict(self.model, self.cfg.parallel.zero_stage == 3, self.dist.rank,
                                      self.groups.tp_group if self.cfg.parallel.tensor_parallel > 1 else None)
        if self.dist.rank == 0:
            # init_from: the chain back to an imported release, whose reference data `vgpt convert
            # to-reference` needs (token table, tokenizer, config.json)
            save_export(full, export, self.cfg.model, extra={"stage": self.stage_name, "step": self.step,
                                                             "init_from": self.cfg.train.init_from,
                                                             **self._data_recipe()})
        self.ckpt.wait()  # the last checkpoint is committed before the stage counts as done
        self._barrier()
        self.sinks.close()
        return export

    @property
    def async_checkpoint(self) -> bool:
        configured = self.cfg.train.async_checkpoint
        return self.device.type != "cpu" if configured is None else configured

    def _save(self, background: bool) -> None:
        self.ckpt.save(self.engine, self.step, self.trainer_state(), self._barrier, model=self.model,
                       tp_rank=self.groups.tp_rank if self.groups else 0, background=background)

    def close(self) -> None:
        """Release this stage's tensor/sequence-parallel groups (megatron keeps them in globals), so
        the next stage of a curriculum can build its own; the default process group stays."""
        self.ckpt.close()
        if self.groups is not None:
            destroy_process_groups()
            self.groups = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _data_recipe(self) -> dict:
        """Where the training latents came from, for `vgpt predict` to make its context the same way."""
        if self.cfg.train.data != "latents":
            return {}
        root, st = self.cfg.data.root, self.cfg.data.stage
        if "://" not in root:
            root = str(Path(root).resolve())
        return {"data_root": root, "frame_interval": st.interval_value if st.interval == "fixed" else st.interval_min}

    # ------------------------------------------------------------ logging
    def _log_line(self, text: str) -> None:
        log.info(text)  # rank 0 only, unless VGPT_LOG_RANKS=all (parallel/logs.py)

    def _record(self, records: list[dict], start_step: int, start_time: float) -> None:
        """Log flushed records: throughput and MFU are the window's (since the last flush), timed
        after the flush's sync; one metrics.jsonl line per step; the console on log steps."""
        if not records:
            return
        tc = self.cfg.train
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        self._window_start = now
        tokens = sum(m["tokens"] for m in records)
        samples = sum(m["samples"] for m in records)
        flops = sum(train_flops(self.cfg.model, self.n_params, m["tokens"], m["attention_pairs"]) for m in records)
        peak = self.peak_flops
        for m in records:
            m["step_time"] = elapsed / len(records)
            m["tokens_per_s"] = tokens / elapsed
            m["samples_per_s"] = samples / elapsed
            if peak:
                m["mfu"] = flops / elapsed / (peak * self.dist.world_size)
        self.history.extend(records)
        if self.dist.rank != 0:
            return
        self.sinks.write(records)
        for m in records:
            if self._log_due(m["step"], start_step):
                done = m["step"] - start_step
                eta = (tc.steps - m["step"]) * (now - start_time) / done
                mfu = f"  MFU {m['mfu'] * 100:.1f}%" if "mfu" in m else ""
                log.info(self.progress_line(m, mfu, eta))

    def progress_line(self, m: dict, mfu: str, eta: float) -> str:
        return (f"[{self.stage_name}] step {m['step']:6d}/{self.cfg.train.steps}  loss {m['loss']:.4f}  "
                f"grad_norm {m['grad_norm']:.3f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  "
                f"{m['samples_per_s']:.2f} samples/s  {m['step_time'] * 1000:.0f} ms/step{mfu}  ETA {eta:.0f}s")


def _span(tags: list[str]) -> str:
    return tags[0] if len(tags) == 1 else f"{len(tags)} checkpoints, {tags[0]}..{tags[-1]}"


def skipped_window_error(records: list[dict], reasons: list[str], replicas: int, limit: float) -> str | None:
    """Why a flushed window must stop the run, or None: the loader skipped more than `limit` of its
    samples (videos too short for the stage, corrupt shards, too many tokens), and a run that goes on
    trains on nothing. `reasons` are the skip reasons gathered from every rank (each data-parallel
    replica counted `replicas` times, once per TP/SP rank); every rank reaches the same verdict."""
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


def check_layout_fits(cfg: JobConfig, world_size: int) -> None:
    """Parallel layout errors before any process group starts."""
    ParallelDims.from_config(cfg.parallel, world_size, cfg.model)
