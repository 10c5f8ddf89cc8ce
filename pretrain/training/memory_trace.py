"""The activation memory of one training step, traced through the real model code without allocating it.

The planner (memory_plan.py) needs what one rank holds during forward and
backward: activations with the configured checkpointing, the attention
backend's saved tensors, temporaries, and, where ZeRO keeps them whole, the
gradients. A hand-written formula drifts from the code; so the real `VideoGPT`
forward and backward run under PyTorch's `FakeTensorMode` (tensors with
shapes and no storage) while `torch.distributed._tools.mem_tracker.MemTracker`
follows every storage's life and reports the peak.

What is emulated, because a plan runs before (and without) any process group:
  tensor parallel  the TP_PLAN Linears (parallelize.py) get this rank's shard
                   shape (column: out/tp, row: in/tp); the qkv view infers the
                   heads per rank from it, as under megatron-core;
  sequence parallel  the backbone runs on L/sp tokens and the attention on the
                   full L with heads/sp, Ulysses' steps (parallel/sequence_parallel.py)
                   with each collective's output a fresh tensor of its shape
                   (what an all-to-all or all-gather allocates);
  device attention a stand-in autograd op holding what the device's backend
                   saves: FlexAttention (CUDA) q, k, v, out and logsumexp, its
                   compiled kernel not running on fake tensors on a CPU host; the
                   block-wise backend on an NPU, its permuted copies too (its
                   per-segment calls cost minutes to trace at 64k tokens). The real
                   block-wise code is traced for the host (CPU) plan.
Activation checkpointing is the real one (`apply_activation_checkpointing`).

Tracing 32 layers of 64k tokens would take minutes; every block is the same,
so the model is traced with 1 and 2 blocks and the peak extrapolated linearly
in the number of blocks (`trace_step`). Parameters are never tracked here: the
planner counts them on a `meta` build and partitions them by ZeRO, TP and SP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from jobconfig.model import ModelConfig
from pretrain.model import attention
from pretrain.model.videogpt import VideoGPT
from pretrain.training.parallelize import SP_TARGET, TP_PLAN, apply_activation_checkpointing


@dataclass(frozen=True)
class TraceResult:
    """Bytes one rank holds at the peak of forward + backward (parameters and buffers excluded)."""
    activations: int   # saved activations, temporaries, inputs, the attention's saved tensors
    gradients: int     # full gradients alive at that moment (0 when ZeRO-2/3 takes them away)


# ---------------------------------------------------------------- emulated parallelism
def _matches(name: str, pattern: str) -> bool:
    a, b = name.split("."), pattern.split(".")
    return len(a) == len(b) and all(q == "*" or p == q for p, q in zip(a, b))


def shard_like_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Give every TP_PLAN Linear this rank's shard shape (parallel/tensor_parallel.py `shard_tensor`)."""
    if tp == 1:
        return
    for name, mod in model.named_modules():
        style = next((s for p, s in TP_PLAN.items() if _matches(name, p)), None)
        if style is None:
            continue
        out_f, in_f = mod.weight.shape
        shape = (out_f, in_f // tp) if style == "row" else (out_f // tp, in_f)
        mod.weight = nn.Parameter(mod.weight.new_empty(shape))
        if mod.bias is not None and style != "row":
            mod.bias = nn.Parameter(mod.bias.new_empty(out_f // tp))


class _FakeAllToAll(torch.autograd.Function):
    """An all-to-all's memory: a stacked send buffer, a receive buffer, the concatenated result."""
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, sp):
        ctx.args = (gather_dim, scatter_dim, sp)
        return _all_to_all_shape(x, scatter_dim, gather_dim, sp)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_shape(grad, *ctx.args), None, None, None


def _all_to_all_shape(x, scatter_dim, gather_dim, sp):
    send = torch.stack(x.chunk(sp, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    return torch.cat([recv[0]] * sp, dim=gather_dim)  # the real one concatenates the sp received pieces


class _FakeGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp):
        ctx.sp = sp
        return torch.cat([torch.empty_like(x) for _ in range(sp)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.sp, dim=1)[0] * ctx.sp, None


class EmulatedUlysses:
    """UlyssesForward (parallel/sequence_parallel.py) of rank 0, its collectives emulated."""

    def __init__(self, module: nn.Module, sp: int):
        self.inner, self.sp = module.forward, sp

    def __call__(self, x, position_ids, attn):
        B, L, _ = x.shape
        chunk = -(-L // self.sp)
        pad = chunk * self.sp - L
        if pad:
            x, position_ids = F.pad(x, (0, 0, 0, pad)), F.pad(position_ids, (0, pad))

        def local_attn(q, k, v):
            qkv = _FakeAllToAll.apply(torch.stack([q, k, v]), 2, 3, self.sp)
            q, k, v = (t[:, :, :L] for t in qkv.unbind(0))
            out = attn(q, k, v)
            if qkv.shape[3] - L:
                out = F.pad(out, (0, 0, 0, qkv.shape[3] - L))
            return _FakeAllToAll.apply(out, 2, 1, self.sp)

        hidden = self.inner(x[:, :chunk], position_ids[:, :chunk], local_attn)
        return _FakeGather.apply(hidden, self.sp)[:, :L]


class _FlexStandIn(torch.autograd.Function):
    """FlexAttention's memory: the output, and q, k, v, out and the fp32 logsumexp saved for backward."""
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---------------------------------------------------------------- the trace
@contextlib.contextmanager
def _own_attention_caches():
    """The attention backends cache per-layout index tensors across batches, keyed by layout and device
    (pretrain/model/attention.py): fake ones made here must not serve a real run later in this process
    (`vgpt train` plans before it trains), so the caches are restored as they were."""
    caches = (attention._blockwise_plans_cache, attention._flex_masks)
    saved = [OrderedDict(c) for c in caches]
    try:
        yield
    finally:
        for c, before in zip(caches, saved):
            c.clear()
            c.update(before)


def _trace_blocks(cfg: ModelConfig, blocks: int, clips, latent_hw, dtype, tp: int, sp: int,
                  checkpointing: bool, keep_grads: bool, backend: str) -> TraceResult:
    cfg = dataclasses.replace(cfg, num_layers=blocks, phi3_checkpoint=None,
                              attention="blockwise" if backend in STAND_INS else backend)
    B, F_ = len(clips), max(sum(sum(s) for s in row) for row in clips)
    h, w = latent_hw
    with _own_attention_caches(), FakeTensorMode(allow_non_fake_inputs=True):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the training dtype, as the engine holds it
        try:
            model = VideoGPT(cfg)
        finally:
            torch.set_default_dtype(old)
        shard_like_tensor_parallel(model, tp)
        if sp > 1:
            target = model.get_submodule(SP_TARGET)
            target.forward = EmulatedUlysses(target, sp)
        if checkpointing:
            apply_activation_checkpointing(model)
        if backend in STAND_INS:
            for block in model.backbone.layers:
                block.self_attn.forward = _stand_in_forward(block.self_attn, STAND_INS[backend])
        model.train()
        seq = model.sequence(clips, latent_hw)
        if not keep_grads:  # ZeRO-2/3: each gradient leaves for the reduce bucket once accumulated
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Expected a tensor")  # the tracker on None grads
            x = torch.randn(B, F_, cfg.latent_channels, h, w)  # the loader's float32 latents
            noise = torch.randn_like(x)
            t = torch.rand(B, F_)
            out = model(noise, x, t, seq)
            loss = ((out.float() - x) ** 2).mean()
            loss.backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    grads = peak.get(_MemRefType.GRAD, 0)
    activations = sum(v for k, v in peak.items() if k not in ("Total", _MemRefType.PARAM, _MemRefType.BUFFER,
                                                             _MemRefType.GRAD, _MemRefType.OPT))
    return TraceResult(activations=int(activations), gradients=int(grads))


class _BlockwiseStandIn(torch.autograd.Function):
    """The block-wise backend's memory on a device: q, k, v permuted per sample (three copies), the
    fused kernel's output and fp32 logsumexp saved, the concatenated and un-permuted output."""
    @staticmethod
    def forward(ctx, q, k, v):
        saved = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(q),
                 q.new_empty(q.shape[:-1], dtype=torch.float32)]
        ctx.save_for_backward(*saved)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


STAND_INS = {"flex": _FlexStandIn, "blockwise-device": _BlockwiseStandIn}


def _stand_in_forward(attn_module, op):
    """The block's attention with a device backend's memory (a stand-in) in place of the backend call."""
    inner = attn_module.forward

    def forward(x, cos, sin, attn):
        return inner(x, cos, sin, lambda q, k, v: op.apply(q, k, v))
    return forward


def trace_step(cfg: ModelConfig, clips, latent_hw: tuple[int, int], dtype: torch.dtype = torch.bfloat16,
               tp: int = 1, sp: int = 1, checkpointing: bool = True, keep_grads: bool = False,
               backend: str = "blockwise") -> TraceResult:
    """Peak bytes of one rank's forward + backward of a batch of rows `clips` (data/batch.py) at
    `cfg.num_layers` blocks: traced at 1 and 2 blocks, extrapolated linearly (module docstring).
    Cached per process: a launch plans the same shapes for several stages and node counts."""
    key = (repr(cfg), repr(clips), tuple(latent_hw), dtype, tp, sp, checkpointing, keep_grads, backend)
    if key not in _CACHE:
        _CACHE[key] = _trace_step(cfg, clips, tuple(latent_hw), dtype, tp, sp, checkpointing, keep_grads, backend)
    return _CACHE[key]


_CACHE: dict[tuple, TraceResult] = {}


def _trace_step(cfg, clips, latent_hw, dtype, tp, sp, checkpointing, keep_grads, backend) -> TraceResult:
    one = _trace_blocks(cfg, 1, clips, latent_hw, dtype, tp, sp, checkpointing, keep_grads, backend)
    if cfg.num_layers == 1:
        return one
    two = _trace_blocks(cfg, 2, clips, latent_hw, dtype, tp, sp, checkpointing, keep_grads, backend)
    n = cfg.num_layers - 1
    return TraceResult(activations=max(one.activations + n * (two.activations - one.activations), 0),
                       gradients=max(one.gradients + n * (two.gradients - one.gradients), 0))
