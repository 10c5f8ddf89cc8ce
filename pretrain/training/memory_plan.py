"""Will it fit? One stage's per-device memory at peak and its step time, on paper.

`plan_stage(cfg, world_size, device)` answers, for the layout the config and
world size give (DP x TP x SP, ZeRO stage, precision, offload, activation
checkpointing), what one device holds at its peak:
  parameters       bf16 (fp32 under precision fp32), this TP rank's shard, /(dp x sp) under ZeRO-3
                   (buffers, the sin-cos table, whole);
                   plus the two blocks ZeRO-3 has gathered (the one running, the one prefetched);
  gradients        whole under ZeRO 0/1 (traced: they grow while activations shrink), this rank's
                   partition under ZeRO-2/3, plus the fp32 gradient partition the optimizer reads;
  optimizer        fp32 masters and AdamW's two moments, /(dp x sp) under ZeRO >= 1 (DeepSpeed's
                   bf16 optimizer partitions them under ZeRO-0 too); on the host with offload;
  activations      traced through the real model code with the configured checkpointing
                   (memory_trace.py), for the stage's longest sample: every clip one frame,
                   2F - 1 frame copies, capped by data.stage.max_tokens;
  attention        the backend's workspace outside the trace: FlexAttention's block mask on CUDA,
                   the largest segment's fp32 scores of the block-wise backend on NPU; 0 on the
                   host (the CPU kernels' internal buffers are not tensors);
  optimizer step   a second peak, after the activations are gone: whole gradients (ZeRO 0/1) and
                   unfused AdamW's two fp32 temporaries per stepped tensor (CPU, NPU); shown as what it
                   adds beyond the backward peak;
  buckets          DeepSpeed's gradient reduce bucket (reduce_bucket_size elements, fp32 under
                   ZeRO-1, the training dtype under ZeRO-2, twice with overlap_comm), ZeRO-3's
                   reduce and prefetch buckets;
and on the host, the async checkpoint's buffers (pretrain/checkpoint/sharded.py `capture`: ZeRO
rank 0 of each TP rank stages the module's weights, every rank its fp32 masters and moments; the
rank 0 figure, the largest) and offloaded state. The device fits the layout when the peak plus the
device's runtime reserve (jobconfig/plan.py DEVICES) is at most its memory.

`smallest_fix` tries, in order of cost, more sequence parallel, more tensor parallel, a higher
ZeRO stage, optimizer (then parameter) offload, activation checkpointing, at the same world size,
and names the first that fits. The step time is `train_flops` (metrics.py) of that sample over
the device's peak FLOP/s at `plan.mfu`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from data.batch import patches_per_frame, sequence_length
from data.buckets import batch_of_shape
from jobconfig.errors import ConfigError
from jobconfig.job import JobConfig
from jobconfig.plan import GIB, DeviceSpec
from parallel.dims import ParallelDims
from pretrain.model.videogpt import VideoGPT
from pretrain.training.memory_trace import _matches, trace_step
from pretrain.training.metrics import allowed_attention_pairs, train_flops
from pretrain.training.parallelize import TP_PLAN

DEFAULT_BUCKET = int(5e8)      # DeepSpeed's reduce_bucket_size and allgather_bucket_size default
DEFAULT_PREFETCH = int(5e7)    # ZeRO-3's stage3_prefetch_bucket_size default


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    sp: int
    zero: int
    precision: str
    checkpointing: bool
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.sp)

    @classmethod
    def of(cls, cfg: JobConfig, world_size: int) -> "Layout":
        p = cfg.parallel
        return cls(world_size, p.tensor_parallel, p.sequence_parallel, p.zero_stage, p.precision,
                   p.activation_checkpointing, p.offload_optimizer, p.offload_params)

    def describe(self) -> str:
        extra = "".join([", AC" if self.checkpointing else "", ", offload optimizer" if self.offload_optimizer else "",
                         ", offload params" if self.offload_params else ""])
        return f"DP {self.dp} x TP {self.tp} x SP {self.sp}, ZeRO-{self.zero}, {self.precision}{extra}"


@dataclass
class StagePlan:
    stage: str
    layout: Layout
    device: DeviceSpec | None       # None: the host (a CPU run)
    tokens: int                     # tokens of the planned sample (per row)
    rows: int
    breakdown: dict[str, int]       # bytes on one device at peak, by part
    host: dict[str, int]            # bytes on the host per rank
    step_s: float | None = None
    tokens_per_s: float | None = None   # whole job (all DP ranks)
    fix: str | None = None
    fix_peak: int | None = None
    mfu: float = 0.4
    latent_hw: tuple[int, int] = (0, 0)  # the latent shape planned (a latent dataset's heaviest bucket)

    @property
    def peak(self) -> int:
        return sum(self.breakdown.values())

    @property
    def capacity(self) -> int | None:
        return None if self.device is None else int((self.device.memory_gib - self.device.reserve_gib) * GIB)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak <= self.capacity

    def verdict(self) -> str:
        gb = lambda b: f"{b / GIB:.1f} GB"  # noqa: E731
        if self.fits is None:
            return f"peak {gb(self.peak)} (host; no device to fit)"
        if self.fits:
            return f"fits with {gb(self.capacity - self.peak)} to spare"
        fix = f"; smallest fix: {self.fix} (peak {gb(self.fix_peak)})" if self.fix else \
            "; nothing at this world size fits"
        return f"does not fit: {gb(self.peak - self.capacity)} short{fix}"

    def to_dict(self) -> dict:
        return {"stage": self.stage, "layout": self.layout.describe(), "device": self.device.kind if self.device
                else "host", "tokens": self.tokens, "rows": self.rows, "peak_bytes": self.peak,
                "capacity_bytes": self.capacity, "fits": self.fits, "latent_hw": list(self.latent_hw),
                "breakdown_bytes": dict(self.breakdown),
                "host_bytes": dict(self.host), "step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                "fix": self.fix, "verdict": self.verdict()}


# ---------------------------------------------------------------- pieces
def planned_rows(cfg: JobConfig, latent_hw, tokens: int | None = None) -> list[list[list[int]]]:
    """The rows that set the peak: a step's rows, each the stage's longest sample (every clip one
    frame), with frames dropped until it fits data.stage.max_tokens (and `tokens`, if given). A step
    has train.batch_size rows of synthetic data, and the loader's batch of the latent shape of latent
    data (data.batch_size, or its bucket's: data/buckets.py `batch_of_shape`)."""
    P = patches_per_frame(tuple(latent_hw), cfg.model.patch_size)
    synthetic = cfg.train.data == "synthetic"
    cap = min(cfg.model.max_tokens if synthetic else cfg.data.stage.max_tokens, cfg.model.max_tokens,
              tokens or 1 << 62)
    frames = cfg.synthetic.frames if synthetic else cfg.data.stage.frames
    while frames > 1 and sequence_length([[1] * frames], P) > cap:
        frames -= 1
    batch = cfg.train.batch_size if synthetic else batch_of_shape(cfg.data, tuple(latent_hw))
    return [[[1] * frames] for _ in range(batch)]


def default_latent_size(cfg: JobConfig) -> tuple[int, int]:
    """plan.latent_size, else the synthetic latents' size for synthetic data, else 40 x 40 (320 px / 8).
    `vgpt train` and `vgpt plan` plan latent data for its dataset's heaviest shape instead, when they
    can read its index (orchestration/planning.py `dataset_latent_size`)."""
    if cfg.plan.latent_size:
        return tuple(cfg.plan.latent_size)
    if cfg.train.data == "synthetic":
        return cfg.synthetic.latent_height, cfg.synthetic.latent_width
    return 40, 40


def count_params(cfg: JobConfig, tp: int) -> tuple[int, int, int, int, int]:
    """(all parameters, this TP rank's, the largest block's on this rank, buffer elements, the largest
    parameter's elements), on `meta`."""
    key = (repr(cfg.model), tp)
    if key not in _PARAMS:
        _PARAMS[key] = _count_params(cfg, tp)
    return _PARAMS[key]


_PARAMS: dict[tuple, tuple[int, int, int, int, int]] = {}


def _count_params(cfg: JobConfig, tp: int) -> tuple[int, int, int, int, int]:
    with torch.device("meta"):
        model = VideoGPT(dataclasses.replace(cfg.model, phi3_checkpoint=None))
    total = rank = 0
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0]
        style = next((st for pat, st in TP_PLAN.items() if _matches(mod, pat)), None)
        split = style is not None and not (style == "row" and name.endswith("bias"))  # a row bias stays whole
        total += p.numel()
        rank += p.numel() // tp if split else p.numel()
    block = sum(p.numel() for p in model.backbone.layers[0].parameters())
    buffers = sum(b.numel() for b in model.buffers())
    largest = max(p.numel() for p in model.parameters())
    return total, rank, block // tp if tp > 1 else block, buffers, largest


def _ds(cfg: JobConfig, key: str, default):
    return cfg.parallel.deepspeed.get("zero_optimization", {}).get(key, default)


def _workspace(cfg: JobConfig, lay: Layout, device: DeviceSpec | None, rows, P: int) -> int:
    if device is None:
        return 0
    L = max(sequence_length(r, P) for r in rows)
    heads = cfg.model.num_heads // (lay.tp * lay.sp)
    if device.attention == "flex":  # BlockMask: full and partial kv and q index tables, int32
        nb = -(-L // 128)
        return len(rows) * 4 * nb * nb * 4 + len(rows) * heads * L * 4 * 2
    frames = max(sum(s) for r in rows for s in r)  # block-wise: one segment's fp32 scores and softmax
    return heads * (P + 2) * frames * (P + 2) * 4 * 2


def plan_layout(cfg: JobConfig, lay: Layout, device: DeviceSpec | None, latent_hw, tokens: int | None = None,
                stage: str = "stage") -> StagePlan:
    """The plan of one layout (no fix search)."""
    rows = planned_rows(cfg, latent_hw, tokens)
    P = patches_per_frame(tuple(latent_hw), cfg.model.patch_size)
    b = 2 if lay.precision == "bf16" else 4
    n_all, n, block, n_buffers, largest = count_params(cfg, lay.tp)
    z = lay.dp * lay.sp  # ZeRO partitions over the gradient group: dp x sp (parallel/dims.py)
    backend = {"flex": "flex", "blockwise": "blockwise-device"}[device.attention] if device else "blockwise"
    dtype = torch.bfloat16 if lay.precision == "bf16" else torch.float32
    trace = trace_step(cfg.model, rows, tuple(latent_hw), dtype, lay.tp, lay.sp, lay.checkpointing,
                       keep_grads=lay.zero < 2, backend=backend)
    overlap = _ds(cfg, "overlap_comm", device is not None)
    bucket = int(_ds(cfg, "reduce_bucket_size", DEFAULT_BUCKET))
    opt_part = n // z if lay.zero >= 1 or lay.precision == "bf16" else n
    # the fp32 gradient partition the optimizer steps on: under fp32 precision ZeRO-0 has none and ZeRO-2/3
    # hand it the partitioned gradient itself (a same-dtype `.float()` is no copy)
    fp32_grads = 0 if lay.precision == "fp32" and lay.zero != 1 else 4 * (n if lay.zero == 0 else n // z)
    master = 0 if (lay.zero == 0 and lay.precision == "fp32") else 4 * opt_part
    moments = 8 * opt_part
    if lay.zero == 3:
        live = 2 * b * block  # gathered: the block running and the one prefetched
        params = live if lay.offload_params else b * n // z + live
        buckets = bucket * b + int(_ds(cfg, "stage3_prefetch_bucket_size", DEFAULT_PREFETCH)) * b
    else:
        params = b * n
        buckets = 0 if lay.zero == 0 else bucket * (4 if lay.zero == 1 else b) * (2 if overlap else 1)
    grads = trace.gradients if lay.zero < 2 else b * n // z
    host = {"async checkpoint buffers": b * n // (z if lay.zero == 3 else 1) + 12 * opt_part}
    if lay.offload_optimizer:
        host["offloaded optimizer"] = fp32_grads + master + moments
        fp32_grads = master = moments = 0
    if lay.offload_params:
        host["offloaded parameters"] = b * n // z
    breakdown = {"parameters and buffers": params + b * n_buffers, "gradients": grads + fp32_grads,
                 "optimizer (fp32 masters + AdamW)": master + moments, "activations": trace.activations,
                 "attention workspace": _workspace(cfg, lay, device, rows, P), "communication buckets": buckets}
    # the optimizer step is a second peak: activations are gone, but whole gradients (ZeRO 0/1) are there,
    # and unfused AdamW (CPU, NPU; CUDA's is fused) makes two fp32 temporaries of each tensor it steps
    # (sqrt of the second moment, then its quotient): DeepSpeed steps one flat partition (ZeRO >= 1, or bf16),
    # plain torch one parameter at a time
    flat = lay.zero >= 1 or lay.precision == "bf16"
    temps = 0 if lay.offload_optimizer or (device and device.accelerator == "cuda") else \
        8 * (opt_part if flat else largest // (lay.tp if lay.tp > 1 else 1))
    at_step = (b * n if lay.zero < 2 else 0) - grads + temps
    breakdown["optimizer step (beyond backward)"] = max(
        0, at_step - trace.activations - breakdown["attention workspace"])
    plan = StagePlan(stage, lay, device, sequence_length(rows[0], P), len(rows), breakdown, host,
                     latent_hw=tuple(latent_hw))
    if device is not None:
        flops = sum(train_flops(cfg.model, n_all, sequence_length(r, P), allowed_attention_pairs(r, P))
                    for r in rows) / (lay.tp * lay.sp)
        plan.mfu = cfg.plan.mfu
        plan.step_s = flops / (device.peak_flops * cfg.plan.mfu)
        plan.tokens_per_s = lay.dp * sum(sequence_length(r, P) for r in rows) / plan.step_s
    return plan


def candidate_fixes(cfg: JobConfig, lay: Layout):
    """(flag, layout) changes at the same world size, cheapest first: SP, TP, ZeRO, offload, AC."""
    heads = cfg.model.num_heads
    for sp in range(lay.sp + 1, heads // lay.tp + 1):
        if (heads // lay.tp) % sp == 0 and lay.world_size % (lay.tp * sp) == 0:
            yield f"--parallel.sequence_parallel={sp}", dataclasses.replace(lay, sp=sp)
    for tp in (2, 4, 8):
        if tp > lay.tp and heads % (tp * lay.sp) == 0 and lay.world_size % (tp * lay.sp) == 0:
            yield f"--parallel.tensor_parallel={tp}", dataclasses.replace(lay, tp=tp)
    for zero in range(lay.zero + 1, 4):
        yield f"--parallel.zero_stage={zero}", dataclasses.replace(lay, zero=zero)
    if not lay.offload_optimizer and lay.zero >= 1:
        yield "--parallel.offload_optimizer=true", dataclasses.replace(lay, offload_optimizer=True)
    if lay.zero == 3 and not lay.offload_params:
        yield "--parallel.offload_params=true", dataclasses.replace(lay, offload_params=True)
    if not lay.checkpointing:
        yield "--parallel.activation_checkpointing=true", dataclasses.replace(lay, checkpointing=True)


def plan_stage(cfg: JobConfig, world_size: int, device: DeviceSpec | None, latent_hw=None,
               stage: str = "stage", find_fix: bool = True) -> StagePlan:
    """Plan `cfg`'s layout on `world_size` devices of kind `device` (None: the host); when it does
    not fit, the cheapest change that does (module docstring)."""
    latent_hw = tuple(latent_hw or default_latent_size(cfg))
    lay = Layout.of(cfg, world_size)
    ParallelDims.from_config(cfg.parallel, world_size, cfg.model)
    plan = plan_layout(cfg, lay, device, latent_hw, cfg.plan.tokens, stage)
    if find_fix and plan.fits is False:
        short, bd = plan.peak - plan.capacity, plan.breakdown
        state = bd["parameters and buffers"] + bd["gradients"] + bd["optimizer (fp32 masters + AdamW)"]
        act = bd["activations"] + bd["attention workspace"]
        # what each kind of change can free at most: one that cannot cover the shortfall is not traced
        frees = {"sequence_parallel": act, "tensor_parallel": state + act, "zero_stage": state,
                 "offload_optimizer": state, "offload_params": state, "activation_checkpointing": act}
        for flag, cand in candidate_fixes(cfg, lay):
            if frees[flag.split("=")[0].rpartition(".")[2]] < short:
                continue
            try:
                ParallelDims(world_size, cand.tp, cand.sp).check_model(cfg.model)
            except ConfigError:
                continue
            other = plan_layout(cfg, cand, device, latent_hw, cfg.plan.tokens, stage)
            if other.fits:
                plan.fix, plan.fix_peak = flag, other.peak
                break
    return plan


def format_plan(p: StagePlan) -> str:
    """The plan as the `vgpt plan` table of one stage."""
    gb = lambda b: f"{b / GIB:8.2f} GB"  # noqa: E731
    where = p.device.name if p.device else "host (CPU)"
    lines = [f"{p.stage}: {p.layout.describe()} on {where}; {p.rows} row(s) of {p.tokens} tokens "
             f"(latents {p.latent_hw[0]}x{p.latent_hw[1]})"]
    lines += [f"  {k:<34}{gb(v)}" for k, v in p.breakdown.items()]
    lines.append(f"  {'peak per device':<34}{gb(p.peak)}" + (f"  of {gb(p.capacity).strip()} usable "
                                                            f"({p.device.memory_gib:g} GB - "
                                                            f"{p.device.reserve_gib:g} GB runtime)"
                                                            if p.device else ""))
    lines += [f"  host: {k:<28}{gb(v)}" for k, v in p.host.items()]
    if p.step_s is not None:
        lines.append(f"  step {p.step_s:.2f} s, {p.tokens_per_s:,.0f} tokens/s for the job at MFU "
                     f"{p.mfu:.0%} (plan.mfu)")
    lines.append(f"  verdict: {p.verdict()}")
    return "\n".join(lines)
