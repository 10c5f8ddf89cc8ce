"""Tensor parallel (megatron-core layers, applied from outside): TP=2 on gloo equals one process."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from parallel_harness import debug_setup, loss_and_grads, run_ranks

from parallel.tensor_parallel import apply_tensor_parallel, shard_tensor, unshard_tensor
from pretrain.training.parallelize import TP_PLAN


def test_fused_qkv_shards_give_each_rank_its_heads_q_k_and_v():
    H, hd, D, tp = 4, 3, 5, 2
    w = torch.arange(3 * H * hd * D, dtype=torch.float32).view(3 * H * hd, D)
    q, k, v = w.view(3, H, hd, D).unbind(0)
    for rank in range(tp):
        heads = slice(rank * H // tp, (rank + 1) * H // tp)
        local = shard_tensor(w, "column_fused3", rank, tp).view(3, H // tp, hd, D)
        assert torch.equal(local[0], q[heads]) and torch.equal(local[1], k[heads]) and torch.equal(local[2], v[heads])
    for style in ("column", "column_fused2", "column_fused3", "row"):
        full = torch.randn(12, 6)
        assert torch.equal(unshard_tensor([shard_tensor(full, style, r, tp) for r in range(tp)], style), full)
    # a plain column split would hand rank 0 all of q and half of k: not what attention needs
    assert not torch.equal(shard_tensor(w, "column", 0, tp), shard_tensor(w, "column_fused3", 0, tp))


def _tp_worker(rank: int, world: int) -> None:
    from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
    from parallel.tensor_parallel import gather_tensor_parallel_state_dict, tensor_parallel_modules

    cfg, model, batch, seeds = debug_setup()
    dims = ParallelDims(world, tp=2)
    groups = build_process_groups(dims, cfg.model)
    assert dist.get_process_group_ranks(groups.tp_group) == [0, 1]
    assert dims.dp == 1 and dist.get_process_group_ranks(groups.grad_group) == [rank]
    assert (groups.tp_rank, groups.sp_rank, groups.dp_rank) == (rank, 0, 0)
    mpu = groups.deepspeed_mpu()
    assert (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank(), mpu.get_data_parallel_world_size(),
            mpu.get_tensor_model_parallel_src_rank(), mpu.get_data_parallel_group_ranks()) == (2, rank, 1, 0, [rank])

    ref_loss, ref_grads = loss_and_grads(model, cfg, batch, seeds)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}

    tp_model = apply_tensor_parallel(copy.deepcopy(model), TP_PLAN, groups.tp_group)
    sharded = tensor_parallel_modules(tp_model)
    assert len(sharded) == 4 * cfg.model.num_layers
    attn0 = tp_model.backbone.layers[0].self_attn
    assert attn0.qkv_proj.weight.shape == (3 * 64 // 2, 64) and attn0.o_proj.weight.shape == (64, 32)
    assert attn0.qkv_proj.weight.tensor_model_parallel  # DeepSpeed tells shards from replicas by it
    assert tp_model.backbone.layers[0].mlp.gate_up_proj.weight.shape == (172, 64)

    loss, grads = loss_and_grads(tp_model, cfg, batch, seeds)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        owner = name.rpartition(".")[0]
        style = getattr(sharded.get(owner), "tp_style", None)
        expected = ref_grads[name] if style is None else shard_tensor(ref_grads[name], style, rank, 2)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert ref_grads["backbone.layers.0.self_attn.qkv_proj.weight"].abs().max() > 1e-4  # not a trivial parity

    gathered = gather_tensor_parallel_state_dict(tp_model, groups.tp_group)
    assert gathered.keys() == full_state.keys()
    for k, v in full_state.items():
        assert torch.equal(gathered[k], v), k
    destroy_process_groups()


@pytest.mark.slow
def test_tp2_matches_single_process_loss_and_gradients():
    run_ranks(_tp_worker, 2)


def test_plan_pattern_that_matches_nothing_is_an_error():
    from jobconfig.errors import ConfigError
    from parallel.tensor_parallel import _match

    _, model, _, _ = debug_setup()
    assert len(_match(TP_PLAN, model)) == 8
    with pytest.raises(ConfigError, match="matches no module"):
        _match({"backbone.layers.*.attn.qkv": "column_fused3"}, model)
    with pytest.raises(ConfigError, match="expected nn.Linear"):
        _match({"backbone.layers.*.input_layernorm": "column"}, model)
    with pytest.raises(ConfigError, match="style"):
        _match({"backbone.layers.*.mlp.down_proj": "diagonal"}, model)
