"""Ulysses sequence parallelism applied from outside to one module of a plain model.

The target module's forward (x [B, L, D], position_ids [B, L], attn) is replaced,
on this one module instance, by:

  1. pad L to a multiple of sp and keep this rank's contiguous chunk of tokens
     and position ids (RoPE is per token, so rotating the local chunk is exact);
  2. run the layers unchanged on the chunk, with `attn` wrapped so that q, k, v
     go through one all-to-all (scatter heads, gather sequence:
     [B, H, L/sp, D] -> [B, H/sp, L, D]), the ORIGINAL clip attention runs on
     the full sequence for this rank's heads (its ClipMeta describes the full,
     unpadded sequence, so the closure is used as is; padding is cut off
     before it and zero-filled after), and one all-to-all takes the output back;
  3. all-gather the chunks and drop the padding, so everything after the
     target module (token read-out, final layer, loss) is ordinary replicated code.

Gradient contract. After step 3 every SP rank computes the same loss from the
same gathered hidden states, so the gradient arriving at the gather is the
same on every rank. The true backward of an all-gather is a reduce-scatter
(sum over ranks of their grads for my chunk) = sp x my slice: taking the slice
and scaling by sp gives exactly that without a collective. The resulting
per-rank parameter gradients AVERAGE over the SP group to the single-process
gradient: parameters used only after the gather (final layer) get the full
gradient on each rank, those before it get sp x their chunk's share. So the
engine must average gradients over dp x sp (`ParallelGroups.grad_group`), as
DeepSpeed's plain data parallelism does; it must not sum over SP.

Collectives: all_to_all_single and all_gather, both supported by gloo on CPU
(exercised in tests/test_parallel_sp.py), nccl and hccl.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from jobconfig.errors import ConfigError


# ---------------------------------------------------------------- collectives with autograd
def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split `x` into sp pieces along scatter_dim, send piece j to rank j, concat received pieces along gather_dim."""
    sp = dist.get_world_size(group)
    send = torch.stack(x.chunk(sp, dim=scatter_dim)).contiguous()  # [sp, ...]: piece j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # piece i came from rank i: rank order = sequence order


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Autograd all-to-all: the backward is the all-to-all with the two dims swapped."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        sp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        # = reduce-scatter(sum) of grad, because grad is identical on all ranks (module docstring)
        return grad.chunk(sp, dim=ctx.dim)[rank] * sp, None, None


def gather_replicated(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather along `dim` for outputs that every rank then uses identically (see the gradient contract)."""
    return _GatherReplicated.apply(x, dim, group)


# ---------------------------------------------------------------- the wrapper
def ulysses_attention(attn, seq_len: int, group):
    """Wrap a full-sequence `attn(q, k, v)` ([B, H, L, D]) for q, k, v holding a local sequence chunk.

    `seq_len` is the real length L; the gathered sequence may be longer by the padding.
    """
    def local_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qkv = all_to_all(torch.stack([q, k, v]), scatter_dim=2, gather_dim=3, group=group)  # [3,B,H/sp,Lpad,D]
        q, k, v = (t[:, :, :seq_len] for t in qkv.unbind(0))
        out = attn(q, k, v)
        pad = qkv.shape[3] - seq_len
        if pad:
            out = F.pad(out, (0, 0, 0, pad))  # padding tokens attend to nothing: zeros, no NaN
        return all_to_all(out, scatter_dim=2, gather_dim=1, group=group)  # [B, H, Lpad/sp, D]

    return local_attn


class UlyssesForward:
    """Replacement `forward` for one module instance: see the module docstring."""

    def __init__(self, module: nn.Module, group):
        self.inner = module.forward  # the class's bound forward, captured before replacement
        self.group = group
        self.sp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor, attn) -> torch.Tensor:
        B, L, _ = x.shape
        chunk = -(-L // self.sp)
        pad = chunk * self.sp - L
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            position_ids = F.pad(position_ids, (0, pad))
        lo, hi = self.rank * chunk, (self.rank + 1) * chunk
        hidden = self.inner(x[:, lo:hi], position_ids[:, lo:hi], ulysses_attention(attn, L, self.group))
        return gather_replicated(hidden, dim=1, group=self.group)[:, :L]


def apply_sequence_parallel(model: nn.Module, group, target: str, local_heads: int) -> nn.Module:
    """Make `model.<target>` run Ulysses SP over `group`; in place, returns `model`.

    `target` is a module called as `forward(x [B, L, D], position_ids [B, L],
    attn)` whose attention callable sees [B, H, L, D] (the model family names
    it, pretrain/training/parallelize.py); `local_heads` is H on this rank,
    after any tensor parallelism. Parameter names and the module tree are
    untouched (only the instance's `forward` is replaced), so checkpoints and
    ZeRO see the plain model. Every rank of `group` must feed the same batch.
    A group of one rank changes nothing.
    """
    module = model.get_submodule(target)
    if isinstance(module.__dict__.get("forward"), UlyssesForward):
        raise RuntimeError(f"apply_sequence_parallel: {target} is already sequence parallel")
    sp = dist.get_world_size(group)
    if sp == 1:
        return model
    if local_heads % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} does not divide the {local_heads} attention heads "
                          f"per rank of {target} (model.num_heads / parallel.tensor_parallel)")
    module.forward = UlyssesForward(module, group)
    return model
