"""How Video-GPT is parallelised, applied from outside to the plain model (torchtitan's
`parallelize.py`): this model's tensor-parallel plan, its sequence-parallel target,
activation checkpointing and compile policy. `parallel/` holds the generic machinery
that takes these as data; the model files know nothing of any of it.

Order matters and is fixed here: tensor parallel first (it swaps Linear
layers, so the heads per rank shrink), then sequence parallel (it checks the
heads per rank), then activation checkpointing (it wraps whole blocks,
whatever their layers became). No torch.compile is applied yet: the blocks'
shapes change with every clip partition, and compiling them needs the
shape-bucketing of the GPU-path work (issue 15).
"""
from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from jobconfig.parallel import ParallelConfig
from parallel.dims import ParallelGroups
from parallel.sequence_parallel import apply_sequence_parallel
from parallel.tensor_parallel import apply_tensor_parallel

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
# the modules recomputed in backward under activation checkpointing
CHECKPOINTED_BLOCKS = "backbone.layers"


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


def parallelize(model: nn.Module, pc: ParallelConfig, groups: ParallelGroups | None) -> nn.Module:
    """Everything `parallel:` asks of this model, in place; returns it."""
    if pc.tensor_parallel > 1:
        tensor_parallelize(model, groups.tp_group)
    if pc.sequence_parallel > 1:
        sequence_parallelize(model, groups.sp_group)
    if pc.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model
