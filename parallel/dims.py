"""Parallel layout: how the world splits into tensor, sequence and data parallel groups.

`ParallelDims(world_size, tp, sp)` is pure arithmetic and validation, usable
before any process group exists, so a bad layout fails at startup with the
config keys and numbers in the message, not as a hang or a shape error deep
in the first step.

`build_process_groups(dims)` then creates the groups through megatron-core's
`parallel_state.initialize_model_parallel`, with Ulysses sequence parallel
mapped onto megatron's *context-parallel* dimension. The mapping is exact:
megatron's CP group is the set of ranks that hold the same model shard (same
TP rank) and split one sample's sequence, which is what a Ulysses group is;
megatron's data-parallel group (`with_context_parallel=False`) is then the
ranks that see different samples, and its DP x CP group is every rank holding
the same TP shard, i.e. the group over which gradients are reduced and ZeRO
partitions state. One rank-ordering authority (megatron's 'tp-cp-ep-dp-pp'
order: TP fastest, so TP peers are neighbours on a node) keeps TP and SP
consistent with each other and with the megatron TP layers, which read the
same global state. Megatron's own context-parallel attention (ring/a2a inside
its TransformerLayer) is not used: only its group.

Rank layout (pp = 1): global rank = tp_rank + tp * (sp_rank + sp * dp_rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from jobconfig.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    sp: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise ConfigError(f"world size: got {self.world_size}, expected a positive integer")
        for key, value in (("parallel.tensor_parallel", self.tp), ("parallel.sequence_parallel", self.sp)):
            if value < 1:
                raise ConfigError(f"{key}: got {value}, expected a positive integer")
        if self.world_size % (self.tp * self.sp):
            raise ConfigError(f"parallel.tensor_parallel={self.tp} x parallel.sequence_parallel={self.sp} "
                              f"does not divide world size {self.world_size}")

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int, model_cfg=None) -> "ParallelDims":
        """From `JobConfig.parallel` (and `.model` to check the shapes); raises ConfigError."""
        dims = cls(world_size, parallel_cfg.tensor_parallel, parallel_cfg.sequence_parallel)
        if model_cfg is not None:
            dims.check_model(model_cfg)
        return dims

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different samples one step sees (per micro-batch slot)."""
        return self.world_size // (self.tp * self.sp)

    def check_model(self, model_cfg) -> None:
        """The model's shapes must split evenly: heads over TP then SP, MLP width over TP."""
        heads, tp, sp = model_cfg.num_heads, self.tp, self.sp
        if heads % tp:
            raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.num_heads={heads}")
        if model_cfg.mlp_size % tp:
            raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.mlp_size={model_cfg.mlp_size}")
        if (heads // tp) % sp:
            where = f"the {heads // tp} heads per tensor-parallel rank (model.num_heads={heads} / " \
                    f"parallel.tensor_parallel={tp})" if tp > 1 else f"model.num_heads={heads}"
            raise ConfigError(f"parallel.sequence_parallel={sp} does not divide {where}: "
                              "Ulysses gives every sequence-parallel rank whole heads")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, sp_rank, dp_rank) of a global rank, in megatron's tp-cp-dp order."""
        return rank % self.tp, (rank // self.tp) % self.sp, rank // (self.tp * self.sp)


@dataclass
class ParallelGroups:
    """This rank's process groups and coordinates. Build with `build_process_groups`.

    tp_group  ranks sharing one sample and sharding the weights (megatron TP)
    sp_group  ranks sharing one sample and one weight shard, splitting its tokens (Ulysses)
    dp_group  ranks seeing different samples, same TP and SP position
    grad_group  dp x sp: ranks holding the same weight shard; gradients are
              AVERAGED over it and ZeRO partitions over it (see sequence_parallel.py)
    Data sharding uses (dp_rank, dims.dp): TP and SP peers must get the same batch.
    """
    dims: ParallelDims
    rank: int
    tp_group: Any
    sp_group: Any
    dp_group: Any
    grad_group: Any

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def sp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    def deepspeed_mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The `mpu` object `deepspeed.initialize(mpu=...)` queries, over these groups.

    "Model parallel" is TP. "Data parallel" is deliberately the dp x sp group
    and no sequence-parallel size is reported: told about SP, DeepSpeed would
    SUM gradients over the SP ranks, while our Ulysses wrapper makes the
    per-rank gradients AVERAGE to the true one (every SP rank computes the
    same full loss). Consequence for batch bookkeeping: DeepSpeed's
    data-parallel world size is dp * sp, so its `train_batch_size` counts each
    sample sp times (micro_batch * grad_accum * dp * sp).
    """

    def __init__(self, groups: ParallelGroups):
        self._g = groups

    def _size(self, group) -> int:
        return dist.get_world_size(group)

    def _rank(self, group) -> int:
        return dist.get_rank(group)

    def get_model_parallel_group(self):
        return self._g.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self._g.dims.tp

    def get_model_parallel_rank(self) -> int:
        return self._g.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._g.rank - self._g.tp_rank  # TP peers are consecutive global ranks

    def get_data_parallel_group(self):
        return self._g.grad_group

    def get_data_parallel_world_size(self) -> int:
        return self._size(self._g.grad_group)

    def get_data_parallel_rank(self) -> int:
        return self._rank(self._g.grad_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._g.grad_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def build_process_groups(dims: ParallelDims, model_cfg=None) -> ParallelGroups:
    """Create TP, SP (megatron context-parallel), DP and DP x SP groups; collective over all ranks.

    Needs the default process group started (`parallel.device.init_process_group`)
    with exactly `dims.world_size` ranks. Validation happens before megatron is
    touched. Call `destroy_process_groups()` before building another layout in
    the same process (megatron keeps them in module globals).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_process_groups: torch.distributed is not initialised; "
                           "call parallel.device.init_process_group first")
    if dist.get_world_size() != dims.world_size:
        raise ConfigError(f"ParallelDims was built for world size {dims.world_size} "
                          f"but the process group has {dist.get_world_size()} ranks")
    if model_cfg is not None:
        dims.check_model(model_cfg)

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        raise RuntimeError("build_process_groups: megatron parallel state already initialised; "
                           "call destroy_process_groups() first")
    # no extra gloo twins of every group: they serve megatron's distributed
    # optimizer, which we do not use (DeepSpeed owns the optimizer)
    ps.initialize_model_parallel(tensor_model_parallel_size=dims.tp, context_parallel_size=dims.sp,
                                 create_gloo_process_groups=False)
    return ParallelGroups(dims=dims, rank=dist.get_rank(),
                          tp_group=ps.get_tensor_model_parallel_group(),
                          sp_group=ps.get_context_parallel_group(),
                          dp_group=ps.get_data_parallel_group(with_context_parallel=False),
                          grad_group=ps.get_data_parallel_group(with_context_parallel=True))


def destroy_process_groups() -> None:
    """Forget megatron's groups (the default process group stays)."""
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
