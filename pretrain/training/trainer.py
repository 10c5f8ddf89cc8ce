"""One Trainer for all four curriculum stages; stages differ by config only: build, step, loop.

Each step: this rank's rows of the global batch (a pure function of the step,
so resume and world-size changes are exact), per-row noise seeds from the
global sample index, the next-clip loss through the DeepSpeed engine.
Around the steps: the resume plan (resume_plan.py) carried out before the
first one; the records of the steps handed to the metrics window
(metrics_window.py: flushed without a per-step device sync, to the console,
metrics.jsonl, TensorBoard and W&B); checkpoints through the one
CheckpointManager (in the background with `train.async_checkpoint`); and at
the end the export directory (`from_pretrained`) that the next stage starts
from. Every `eval.every` steps (and at the last) the held-out evaluator
(pretrain/evaluation/latent_eval.py, handed in) adds `heldout_loss*` to that step's
record; its time is left out of the window's throughput and MFU and reported
as `eval_time_share` of the run.

The model stays the plain single-device VideoGPT (`self.model`); the engine
wraps it for forward/backward/step; nothing unwraps `.module`.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from data.batch import patches_per_frame, sequence_length
from data.sources import make_source
from jobconfig.job import JobConfig
from jobconfig.secrets import redact
from parallel import logs
from parallel.device import DistInfo, init_process_group, select_device
from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
from parallel.engine import build_engine, gather_full_state_dict
from pretrain.checkpoint.export import export_path, load_export, save_export, weights_fingerprint
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.storage import CHECKPOINTS_DIR
from pretrain.model.videogpt import build_model
from pretrain.training.hooks import TrainerHooks
from pretrain.training.metric_sinks import METRICS_FILE, MetricSinks
from pretrain.training.metrics import allowed_attention_pairs, peak_flops
from pretrain.training.metrics_window import MetricsWindow, keep_metrics_upto
from pretrain.training.objective import next_clip_loss, row_seed
from pretrain.training.optimizer import build_optimizer, build_scheduler
from pretrain.training.parallelize import TP_PLAN, parallelize
from pretrain.training.resume_plan import ResumePlan, plan_resume, set_aside, span

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: JobConfig, stage_name: str = "stage", data_factory: Callable | None = None,
                 hooks: TrainerHooks | None = None, evaluator_factory: Callable | None = None,
                 predictor_factory: Callable | None = None):
        """`evaluator_factory(cfg, device, dp_rank, dp_size, dp_group)`: the held-out evaluator of
        `eval.every` (pretrain/evaluation/latent_eval.py `make_evaluator`, a layer above this one, so
        the caller hands it in); required when eval.every > 0. `predictor_factory(cfg, samples, out_dir,
        device)`: the held-out predictions of `eval.predict_every` (pretrain/inference/heldout_predict.py
        `make_predictor`), rank 0 only."""
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
                                   make_optimizer=lambda params: build_optimizer(params, cfg.train, self.device.type),
                                   make_scheduler=lambda opt: build_scheduler(opt, cfg.train, self.dist.world_size),
                                   mpu=mpu, micro_batch=self.rows_per_micro(), device_type=self.device.type)
        self.ckpt = CheckpointManager(self.out / CHECKPOINTS_DIR, self.dist.rank, cfg.train.keep_last,
                                      cfg.train.keep_every, before_commit=self.hooks.before_checkpoint_commit)
        self.step = 0
        # peak_flops: per device, for MFU (None: an unknown device, no MFU)
        self.metrics = MetricsWindow(cfg, MetricSinks(self.out, self.stage_name, cfg.train, redact(asdict(cfg))),
                                     self.device.device, self.dist.rank, self.dist.world_size, self.dims.dp,
                                     self.n_params, peak_flops(self.device.device), self.progress_line)
        if cfg.eval.every and evaluator_factory is None:
            raise ValueError("eval.every: this Trainer was built without an evaluator_factory; pass "
                             "pretrain.evaluation.latent_eval.make_evaluator (vgpt train does)")
        self.evaluator = evaluator_factory(cfg, self.device.device, self.dp_rank, self.dp_size,
                                           self.groups.dp_group if self.groups else None) if cfg.eval.every else None
        if cfg.eval.predict_every and predictor_factory is None:
            raise ValueError("eval.predict_every: this Trainer was built without a predictor_factory; pass "
                             "pretrain.inference.heldout_predict.make_predictor (vgpt train does)")
        self.predictor = predictor_factory(cfg, [s for _, s in self.evaluator.set.mine], self.out, self.device.device) \
            if cfg.eval.predict_every and self.dist.rank == 0 else None
        self.eval_seconds = 0.0  # evaluation time of this run (since start or resume)

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

    def resume(self, mode: str) -> ResumePlan:
        """Carry out `--resume mode` (resume_plan.py): the plan is made with every rank re-hashing a
        share of the files (all reach the same plan), then the earlier run is moved aside or the chosen
        checkpoint loaded. Never deletes a checkpoint; metrics.jsonl keeps only the steps up to the one
        resumed from. Returns the plan carried out."""
        plan = plan_resume(mode, self.out, problems=lambda ckpt: self.ckpt.problems(ckpt, collective=True))
        for msg in plan.warnings:
            warnings.warn(msg, stacklevel=2)
        if plan.set_aside:
            self._barrier()  # every rank has looked before rank 0 moves anything
            if self.dist.rank == 0:
                self._log_line(f"--resume {mode}: moved the earlier run ({span(plan.set_aside)}) to "
                               f"{set_aside(self.out)}")
            self._barrier()
        ckpt = plan.checkpoint
        if ckpt is None:
            self._keep_metrics_upto(0)  # steps of a run killed before its first checkpoint are redone
            return plan
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
        return plan

    def _keep_metrics_upto(self, step: int) -> None:
        if self.dist.rank == 0:
            keep_metrics_upto(self.out / METRICS_FILE, step)

    # ------------------------------------------------------------ loop
    def _barrier(self):
        dist.barrier()

    def train_step(self) -> dict[str, Any]:
        """One optimiser step. Returns its record without a device sync: `loss` and `grad_norm`
        may be device tensors, the rest host numbers; the metrics window reads them back."""
        tc = self.cfg.train
        lr = self.engine.get_lr()[0]  # the LR this step trains with (engine.step moves the schedule on)
        loss_sum: torch.Tensor | None = None
        tokens, pairs, step_rows, skipped = 0, 0, [], []
        for _ in range(tc.grad_accum_steps):
            batch, global_rows = self.data.next_batch()
            skipped += [reason for _, _, reason in getattr(batch, "skipped", [])]  # host data of the loader
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
        self.step += 1
        record = {"step": self.step, "loss": loss_sum / tc.grad_accum_steps, "tokens": tokens,
                  "samples": len(step_rows), "attention_pairs": pairs, "grad_norm": self.engine.get_global_grad_norm(),
                  "lr": lr, "sample_rows": step_rows, "skipped": skipped}
        if drawn := getattr(self.data, "source_counts", dict)():  # samples per dataset of a blend: host ints
            record["source_samples"] = drawn
        return record

    def run(self, resume: str = "auto") -> Path:
        """Train to `train.steps`, checkpointing; returns the path of the final export."""
        tc = self.cfg.train
        plan = self.resume(resume)
        start_step, start_time = self.step, time.perf_counter()
        self._log_line(f"{self.stage_name}: {self.n_params / 1e6:.2f}M parameters, world size {self.dist.world_size}, "
                       f"ZeRO-{self.cfg.parallel.zero_stage}, steps {self.step + 1}..{tc.steps}")
        self.metrics.restart_clock()
        while self.step < tc.steps:
            record = self.train_step()
            evaluate = self.eval_due(self.step)
            if evaluate:
                record.update(self.evaluate_heldout(start_time))
            self.metrics.add(record)
            checkpoint = bool(tc.checkpoint_every) and self.step % tc.checkpoint_every == 0 and self.step < tc.steps
            if self.metrics.flush_due(self.step, start_step, checkpoint) or evaluate:
                self.metrics.flush(start_step, start_time)
            if checkpoint:
                self._save(background=self.async_checkpoint)
                self.metrics.restart_clock()  # the save's stall is not training time
            if self.hooks.after_step:
                self.hooks.after_step(self)
        if plan.checkpoint is None or self.step > start_step:  # else we resumed from this very step's checkpoint
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
        if self.evaluator is not None:
            self._log_line(f"{self.stage_name}: held-out evaluation took {self.eval_seconds:.1f}s, "
                           f"{100 * self.eval_seconds / max(time.perf_counter() - start_time, 1e-9):.1f}% of the run")
        self._barrier()
        self.metrics.sinks.close()
        return export

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return self.evaluator is not None and (step % every == 0 or step == self.cfg.train.steps
                                               or self.predict_due(step))

    def predict_due(self, step: int) -> bool:
        every = self.cfg.eval.predict_every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def evaluate_heldout(self, start_time: float) -> dict[str, float]:
        """The held-out losses of the weights now (every rank: collective). Waits for the step's
        kernels first, so its time (left out of the metrics window's) is the evaluation's own."""
        self._sync()
        t0 = time.perf_counter()
        out = self.evaluator.evaluate(self.model, forward=self.engine)
        if self.predictor is not None and self.predict_due(self.step):  # rank 0: no collective inside
            scores, strip = self.predictor.predict(self.model, self.step)
            out.update(scores)
            if strip is not None:
                self.metrics.sinks.write_image(self.step, "heldout_prediction", strip)
        self._sync()
        spent = time.perf_counter() - t0
        self.eval_seconds += spent
        self.metrics.exclude(spent)
        out["eval_time_share"] = self.eval_seconds / max(time.perf_counter() - start_time, 1e-9)
        self._log_line(f"[{self.stage_name}] step {self.step:6d} held-out loss {out['heldout_loss']:.4f} "
                       f"({spent:.2f}s)")
        return out

    def _sync(self) -> None:
        if self.device.type in ("cuda", "npu"):
            getattr(torch, self.device.type).synchronize(self.device.device)

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
        root, st = self.cfg.data.blend()[0].root, self.cfg.data.stage  # a blend: its first dataset's recipe
        if "://" not in root:
            root = str(Path(root).resolve())
        return {"data_root": root, "frame_interval": st.interval_value if st.interval == "fixed" else st.interval_min}

    # ------------------------------------------------------------ logging
    def _log_line(self, text: str) -> None:
        log.info(text)  # rank 0 only, unless VGPT_LOG_RANKS=all (parallel/logs.py)

    def progress_line(self, m: dict, mfu: str, eta: float) -> str:
        return (f"[{self.stage_name}] step {m['step']:6d}/{self.cfg.train.steps}  loss {m['loss']:.4f}  "
                f"grad_norm {m['grad_norm']:.3f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  "
                f"{m['samples_per_s']:.2f} samples/s  {m['step_time'] * 1000:.0f} ms/step{mfu}  ETA {eta:.0f}s")


def check_layout_fits(cfg: JobConfig, world_size: int) -> None:
    """Parallel layout errors before any process group starts."""
    ParallelDims.from_config(cfg.parallel, world_size, cfg.model)
