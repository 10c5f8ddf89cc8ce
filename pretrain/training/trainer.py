"""One Trainer for all four curriculum stages; stages differ by config only.

Each step: this rank's rows of the global batch (a pure function of the step,
so resume and world-size changes are exact), per-row noise seeds from the
global sample index, the next-clip loss through the DeepSpeed engine, logs
(loss, tokens/s, samples/s, step time, grad norm, LR, MFU on GPU) to the
console and TensorBoard, checkpoints through the one CheckpointManager, and at
the end a consolidated safetensors export that the next stage starts from.

The model stays the plain single-device VideoGPT (`self.model`); the engine
wraps it for forward/backward/step; nothing unwraps `.module`.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from data.batch import patches_per_frame, sequence_length
from data.sources import make_source
from jobconfig.job import JobConfig
from parallel.device import DistInfo, init_process_group, select_device
from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
from parallel.engine import build_engine, gather_full_state_dict
from pretrain.checkpoint.export import export_path, load_export, save_export, weights_fingerprint
from pretrain.checkpoint.integrity import CheckpointError
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.model.videogpt import build_model
from pretrain.training.metrics import PEAK_FLOPS, model_flops_per_token
from pretrain.training.objective import next_clip_loss, row_seed
from pretrain.training.optimizer import build_optimizer, build_scheduler
from pretrain.training.parallelize import TP_PLAN, parallelize


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
        self.dims = ParallelDims.from_config(pc, self.dist.world_size, cfg.model)
        self.groups = build_process_groups(self.dims) if self.dims.tp * self.dims.sp > 1 else None
        self.dp_rank = self.groups.dp_rank if self.groups else self.dist.rank
        self.dp_size = self.dims.dp
        self.out = Path(cfg.train.out_dir)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, device=self.device.device, seed=cfg.train.seed)
        if cfg.train.init_from:
            load_export(self.model, cfg.train.init_from)
            self._record_init(cfg.train.init_from)
        parallelize(self.model, pc, self.groups)
        self.data = (data_factory or make_source)(cfg, self.dp_rank, self.dp_size)
        # with SP, DeepSpeed averages gradients over dp x sp ranks (each SP rank holds the full loss)
        mpu = self.groups.deepspeed_mpu() if self.groups else None
        grad_ranks = mpu.get_data_parallel_world_size() if mpu else self.dist.world_size
        # the reference's warmup advances once per process per optimiser step: all ranks count, SP and TP too
        self.engine = build_engine(self.model, pc, cfg.train, grad_ranks,
                                   make_optimizer=lambda params: build_optimizer(params, cfg.train),
                                   make_scheduler=lambda opt: build_scheduler(opt, cfg.train, self.dist.world_size),
                                   mpu=mpu, micro_batch=self.rows_per_micro())
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.dist.rank, cfg.train.keep_last,
                                      cfg.train.keep_every, before_commit=self.hooks.before_checkpoint_commit)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._tb = None

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
        out = {"format": "deepspeed", "world_size": self.dist.world_size, "dp": self.dims.dp, "tp": self.dims.tp,
               "sp": self.dims.sp, "zero_stage": pc.zero_stage, "precision": pc.precision}
        if self.dims.tp > 1:
            out["tp_plan"] = TP_PLAN  # how offline tools merge the TP shards
        return out

    def trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage_name, "step": self.step, "world_size": self.dist.world_size,
                "consumed_samples": self.step * self.global_batch(),
                "global_batch": self.global_batch(), "layout": self.parallel_layout(),
                "loader": self.data.state_dict(), "config": asdict(self.cfg)}

    def resume(self, mode: str) -> bool:
        """`auto`: newest complete checkpoint if any; a path: that checkpoint; `none`: fresh."""
        if mode == "none":
            return False
        # every rank hashes a share of the files; all learn the verdict
        ckpt = self.ckpt.newest_complete(collective=True) if mode == "auto" else Path(mode)
        if ckpt is None:
            return False
        if mode != "auto" and (problems := self.ckpt.problems(ckpt, collective=True)):  # never unpickle unverified
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
        self._log_line(f"resumed {self.stage_name} from {ckpt} at step {self.step}")
        return True

    # ------------------------------------------------------------ loop
    def _barrier(self):
        dist.barrier()

    def train_step(self) -> dict[str, float]:
        tc = self.cfg.train
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the LR this step trains with (engine.step moves the schedule on)
        loss_sum, tokens, rows = 0.0, 0, 0
        self._step_rows = []
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
            loss_sum += loss.detach().float().item()
            if global_rows:  # counted from the clip sizes: the objective already built the token tables
                patches = patches_per_frame(tuple(batch.latents.shape[-2:]), self.cfg.model.patch_size)
                tokens += sum(sequence_length(row, patches) for row in batch.clips)
            rows += len(global_rows)
            self._step_rows += list(global_rows)
        self.step += 1
        stats = torch.tensor([loss_sum / tc.grad_accum_steps, float(tokens), float(rows)], dtype=torch.float64)
        dist.all_reduce(stats)
        consumed: list = [None] * self.dist.world_size
        dist.all_gather_object(consumed, self._step_rows)
        grad_norm = self.engine.get_global_grad_norm()
        return {"step": self.step, "loss": stats[0].item() / self.dist.world_size, "tokens": stats[1].item(),
                "samples": stats[2].item(), "step_time": time.perf_counter() - t0,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": lr,
                "sample_rows": sorted({r for rank_rows in consumed for r in rank_rows})}

    def run(self, resume: str = "auto") -> Path:
        """Train to `train.steps`, checkpointing; returns the path of the final export."""
        tc = self.cfg.train
        resumed = self.resume(resume)
        start_step, start_time = self.step, time.perf_counter()
        n_params = sum(p.numel() for p in self.model.parameters())
        self._log_line(f"{self.stage_name}: {n_params / 1e6:.2f}M parameters, world size {self.dist.world_size}, "
                       f"ZeRO-{self.cfg.parallel.zero_stage}, steps {self.step + 1}..{tc.steps}")
        while self.step < tc.steps:
            m = self.train_step()
            self._record(m, n_params, start_step, start_time)
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.ckpt.save(self.engine, self.step, self.trainer_state(), self._barrier)
            if self.hooks.after_step:
                self.hooks.after_step(self)
        if not resumed or self.step > start_step:  # else we resumed from this very step's checkpoint
            self.ckpt.save(self.engine, self.step, self.trainer_state(), self._barrier)
        export = export_path(self.out)
        full = gather_full_state_dict(self.model, self.cfg.parallel.zero_stage == 3, self.dist.rank,
                                      self.groups.tp_group if self.cfg.parallel.tensor_parallel > 1 else None)
        if self.dist.rank == 0:
            # init_from: the chain back to an imported release, whose reference data `vgpt convert
            # to-reference` needs (token table, tokenizer, config.json)
            save_export(full, export, self.cfg.model, extra={"stage": self.stage_name, "step": self.step,
                                                             "init_from": self.cfg.train.init_from,
                                                             **self._data_recipe()})
        self._barrier()
        if self._tb:
            self._tb.close()
        return export

    def close(self) -> None:
        """Release this stage's tensor/sequence-parallel groups (megatron keeps them in globals), so
        the next stage of a curriculum can build its own; the default process group stays."""
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
        if self.dist.rank == 0:
            print(text, flush=True)

    def _record(self, m: dict, n_params: int, start_step: int, start_time: float) -> None:
        tc = self.cfg.train
        m["tokens_per_s"] = m["tokens"] / m["step_time"]
        m["samples_per_s"] = m["samples"] / m["step_time"]
        name = torch.cuda.get_device_name(self.device.device) if self.device.type == "cuda" else self.device.type
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak:
            seq_len = m["tokens"] / max(m["samples"], 1)
            m["mfu"] = m["tokens_per_s"] * model_flops_per_token(self.cfg.model, n_params, seq_len) / \
                (peak * self.dist.world_size)
        self.history.append(m)
        if self.dist.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"stage": self.stage_name, **m}) + "\n")
        if tc.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            for k in ("loss", "tokens_per_s", "samples_per_s", "step_time", "grad_norm", "lr", "mfu"):
                if k in m:
                    self._tb.add_scalar(f"{self.stage_name}/{k}", m[k], m["step"])
        if m["step"] % tc.log_every == 0 or m["step"] == tc.steps or m["step"] == start_step + 1:
            done = m["step"] - start_step
            elapsed = time.perf_counter() - start_time
            eta = (tc.steps - m["step"]) * elapsed / done
            mfu = f"  MFU {m['mfu'] * 100:.1f}%" if "mfu" in m else ""
            print(self.progress_line(m, mfu, eta), flush=True)

    def progress_line(self, m: dict, mfu: str, eta: float) -> str:
        return (f"[{self.stage_name}] step {m['step']:6d}/{self.cfg.train.steps}  loss {m['loss']:.4f}  "
                f"grad_norm {m['grad_norm']:.3f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  "
                f"{m['samples_per_s']:.2f} samples/s  {m['step_time'] * 1000:.0f} ms/step{mfu}  ETA {eta:.0f}s")


def check_layout_fits(cfg: JobConfig, world_size: int) -> None:
    """Parallel layout errors before any process group starts."""
    ParallelDims.from_config(cfg.parallel, world_size, cfg.model)
