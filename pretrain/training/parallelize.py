"""How Video-GPT is parallelised, applied from outside to the plain model (torchtitan's
`parallelize.py`): this model's tensor-parallel plan, its sequence-parallel target,
activation checkpointing and compile policy. `parallel/` holds the generic machinery
that takes these as data; the model files know nothing of any of it.

Order matters and is fixed here: tensor parallel first (it swaps Linear
layers, so the heads per rank shrink), then sequence parallel (it checks the
heads per rank), then activation checkpointing (it wraps whole blocks,
whatever their layers became), then torch.compile (`train.compile`), inside
the checkpoint: the recomputation in backward runs the same compiled code.

Compile is per block and leaves attention out. The `attn(q, k, v)` a block
receives is a fresh closure over each batch's clip metadata (or Ulysses'
all-to-all around it): traced through, it would recompile every batch or
graph-break in numpy. So the compiled forward is handed one fixed, dynamo-disabled
stand-in that calls the batch's real `attn`, which the eager wrapper puts in a
slot just before: one graph break per block, the norms, QKV + RoPE, o_proj and
SwiGLU around it fused. The sequence length varies with every clip partition;
dynamo's automatic dynamic shapes recompile once, on the second length, and then
keep the length symbolic. As activation checkpointing, compile replaces only the
block instance's `forward`, so parameter names stay those of the plain model.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from jobconfig.parallel import ParallelConfig
from parallel.dims import ParallelGroups
from parallel.sequence_parallel import apply_sequence_parallel
from parallel.tensor_parallel import apply_tensor_parallel
from pretrain.model.backbone import AttnFn

# module-name pattern -> style (parallel/tensor_parallel.py); recorded in every TP checkpoint,
# which is how offline tools merge its shards
TP_PLAN: dict[str, str] = {
    "backbone.layers.*.self_attn.qkv_proj": "column_fused3",
    "backbone.layers.*.self_attn.o_proj": "row",
    "backbone.layers.*.mlp.gate_up_proj": "column_fused2",
    "backbone.layers.*.mlp.down_proj": "row",
}
# the module whose forward maps tokens to tokens with one attention callable: Ulysses wraps it
SP_TARGET = "backbone"
# the modules recomputed in backward under activation checkpointing, and compiled under train.compile
CHECKPOINTED_BLOCKS = "backbone.layers"
COMPILED_BLOCKS = CHECKPOINTED_BLOCKS


def tensor_parallelize(model: nn.Module, tp_group) -> nn.Module:
    return apply_tensor_parallel(model, TP_PLAN, tp_group=tp_group)


def local_attention_heads(model: nn.Module) -> int:
    """Attention heads one rank computes (fewer than model.num_heads after tensor parallel)."""
    attn = model.get_submodule(SP_TARGET).layers[0].self_attn
    return attn.qkv_proj.weight.shape[0] // (3 * attn.head_dim)


def sequence_parallelize(model: nn.Module, sp_group) -> nn.Module:
    return apply_sequence_parallel(model, sp_group, SP_TARGET, local_attention_heads(model))


class CheckpointedForward:
    """Replacement `forward` of one block instance: recomputed in backward while training.

    Only the instance's `forward` changes, so parameter names (checkpoints,
    exports, ZeRO) stay those of the plain model."""

    def __init__(self, block: nn.Module):
        self.block, self.inner = block, block.forward

    def __call__(self, *args):
        if self.block.training:
            return checkpoint(self.inner, *args, use_reentrant=False)
        return self.inner(*args)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each backbone block in backward instead of storing its activations."""
    for block in model.get_submodule(CHECKPOINTED_BLOCKS):
        if not isinstance(block.__dict__.get("forward"), CheckpointedForward):
            block.forward = CheckpointedForward(block)
    return model


# the attention callables of the blocks running now, innermost last: what the compiled
# forwards' fixed stand-in calls (a stack, so that a block run inside another stays right)
_attention_slot: list[AttnFn] = []


def _attend_in_slot(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_slot[-1](q, k, v)


@functools.cache
def _slot_attention() -> AttnFn:
    """The one attention object the compiled blocks ever see: dynamo guards on its
    identity, which never changes, and runs it eagerly (a graph break). Made on the first
    compile, not at import: `torch._dynamo` (with sympy and inductor) costs about 1.3 s of
    CPU to import, in every training process, most of which never compile."""
    return torch._dynamo.disable(_attend_in_slot)


class CompiledForward:
    """Replacement `forward` of one block: its inner forward compiled, attention run eagerly."""

    def __init__(self, inner, backend: str = "inductor"):
        self.inner = inner
        # automatic dynamic shapes (dynamic=None): static on the first length, symbolic from the second
        self.compiled = torch.compile(inner, backend=backend, dynamic=None)
        self.attention = _slot_attention()

    def __call__(self, x, cos, sin, attn: AttnFn):
        _attention_slot.append(attn)
        try:
            return self.compiled(x, cos, sin, self.attention)
        finally:
            _attention_slot.pop()


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each backbone block, inside its activation checkpoint if there is one.

    `backend` is for tests and benchmarks; training uses inductor."""
    for block in model.get_submodule(COMPILED_BLOCKS):
        fwd = block.__dict__.get("forward")
        if isinstance(fwd, CheckpointedForward):
            if not isinstance(fwd.inner, CompiledForward):
                fwd.inner = CompiledForward(fwd.inner, backend)
        elif not isinstance(fwd, CompiledForward):
            block.forward = CompiledForward(block.forward, backend)
    return model


def parallelize(model: nn.Module, pc: ParallelConfig, groups: ParallelGroups | None,
                compile: bool = False) -> nn.Module:
    """Everything `parallel:` asks of this model, and `train.compile`, in place; returns it."""
    if pc.tensor_parallel > 1:
        tensor_parallelize(model, groups.tp_group)
    if pc.sequence_parallel > 1:
        sequence_parallelize(model, groups.sp_group)
    if pc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    return model
