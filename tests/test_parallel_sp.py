"""Ulysses sequence parallel (applied from outside): SP=2 on gloo equals one process."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from parallel_harness import debug_setup, loss_and_grads, run_ranks


def _sp_worker(rank: int, world: int) -> None:
    from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
    from parallel.sequence_parallel import all_to_all
    from pretrain.training.parallelize import sequence_parallelize

    cfg, model, batch, seeds = debug_setup()
    dims = ParallelDims(world, sp=2)
    groups = build_process_groups(dims, cfg.model)
    assert dist.get_process_group_ranks(groups.sp_group) == [0, 1]
    assert dist.get_process_group_ranks(groups.grad_group) == [0, 1]
    assert dist.get_process_group_ranks(groups.dp_group) == [rank]
    assert dist.get_process_group_ranks(groups.tp_group) == [rank]

    # the collective itself: rank r holds sequence chunk r of all heads -> all of the sequence for head r
    x = torch.arange(4 * 2 * 3, dtype=torch.float32).view(1, 4, 2, 3) + 1000 * rank  # [B, H, L/sp, D]
    full = torch.cat([torch.arange(24, dtype=torch.float32).view(1, 4, 2, 3) + 1000 * r for r in range(2)], dim=2)
    y = all_to_all(x, scatter_dim=1, gather_dim=2, group=groups.sp_group)
    assert torch.equal(y, full[:, 2 * rank:2 * rank + 2])
    assert torch.equal(all_to_all(y, scatter_dim=2, gather_dim=1, group=groups.sp_group), x)

    length = model.sequence(batch.clips, tuple(batch.latents.shape[-2:])).src.shape[1]
    assert length % 2 == 1, "the batch must exercise padding"
    ref_loss, ref_grads = loss_and_grads(model, cfg, batch, seeds)

    sp_model = sequence_parallelize(copy.deepcopy(model), groups.sp_group)
    assert sp_model.state_dict().keys() == model.state_dict().keys()
    seen = []
    sp_model.backbone.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    # spy on the clip attention the model builds: it must see H/sp heads of the full, unpadded sequence
    import pretrain.model.videogpt as model_module
    attn_shapes, make_attention = [], model_module.make_attention

    def spying_make_attention(*a, **k):
        attn = make_attention(*a, **k)
        return lambda q, k, v: attn_shapes.append(tuple(q.shape)) or attn(q, k, v)
    model_module.make_attention = spying_make_attention

    loss, grads = loss_and_grads(sp_model, cfg, batch, seeds)
    assert seen == [(length + 1) // 2], "each rank must run the layers on its own chunk only"
    model_module.make_attention = make_attention
    assert attn_shapes == [(2, cfg.model.num_heads // 2, length, cfg.model.head_dim)] * cfg.model.num_layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)

    local_qkv = grads["backbone.layers.0.self_attn.qkv_proj.weight"].clone()
    # activation checkpointing recomputes layers, collectives included, in backward: same result
    from pretrain.training.parallelize import apply_activation_checkpointing
    apply_activation_checkpointing(sp_model)
    ckpt_loss, ckpt_grads = loss_and_grads(sp_model, cfg, batch, seeds)
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=0)
    for name, grad in ckpt_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        # what the engine does over dp x sp: average
        dist.all_reduce(grad, group=groups.grad_group)
        grad /= dist.get_world_size(groups.grad_group)
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the ranks really did different halves of the work
    assert not torch.allclose(local_qkv, ref_grads["backbone.layers.0.self_attn.qkv_proj.weight"], atol=1e-6)
    assert ref_grads["noisy_embedder.proj.weight"].abs().max() > 1e-4
    destroy_process_groups()


@pytest.mark.slow
def test_sp2_matches_single_process_loss_and_gradients_with_padding():
    run_ranks(_sp_worker, 2)


def _sp_deepspeed_worker(rank: int, world: int) -> None:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    import deepspeed

    from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
    from pretrain.training.objective import next_clip_loss
    from pretrain.training.parallelize import sequence_parallelize

    cfg, model, batch, seeds = debug_setup()
    groups = build_process_groups(ParallelDims(world, sp=2), cfg.model)
    _, ref_grads = loss_and_grads(model, cfg, batch, seeds)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    sp_model = sequence_parallelize(copy.deepcopy(model), groups.sp_group)
    mpu = groups.deepspeed_mpu()
    assert mpu.get_data_parallel_world_size() == 2 and mpu.get_model_parallel_world_size() == 1
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "train_batch_size": 2 * mpu.get_data_parallel_world_size(),
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10**9}
    # SGD with lr 1: the update is minus the gradient DeepSpeed reduced over the dp x sp group
    engine, *_ = deepspeed.initialize(model=sp_model, optimizer=torch.optim.SGD(sp_model.parameters(), lr=1.0),
                                      config=config, mpu=mpu)
    loss = next_clip_loss(sp_model, batch, cfg.objective, seeds, forward=engine)
    engine.backward(loss)
    engine.step()
    for name, p in sp_model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    destroy_process_groups()


@pytest.mark.slow
def test_deepspeed_zero2_with_our_mpu_averages_sp_gradients_to_the_single_process_step():
    run_ranks(_sp_deepspeed_worker, 2)


def _tp_sp_worker(rank: int, world: int) -> None:
    from parallel.dims import ParallelDims, build_process_groups, destroy_process_groups
    from parallel.tensor_parallel import shard_tensor, tensor_parallel_modules
    from pretrain.training.parallelize import sequence_parallelize, tensor_parallelize

    cfg, model, batch, seeds = debug_setup()
    groups = build_process_groups(ParallelDims(world, tp=2, sp=2), cfg.model)
    # rank = tp_rank + 2 * sp_rank: TP peers are neighbours, SP peers share a TP rank
    assert dist.get_process_group_ranks(groups.tp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(groups.sp_group) == [rank % 2, rank % 2 + 2]
    ref_loss, ref_grads = loss_and_grads(model, cfg, batch, seeds)

    # TP first: SP then splits each TP rank's 2 heads over its 2 SP peers
    sp_model = sequence_parallelize(tensor_parallelize(copy.deepcopy(model), groups.tp_group), groups.sp_group)
    loss, grads = loss_and_grads(sp_model, cfg, batch, seeds)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    sharded = tensor_parallel_modules(sp_model)
    for name, grad in grads.items():
        dist.all_reduce(grad, group=groups.grad_group)
        grad /= dist.get_world_size(groups.grad_group)
        style = getattr(sharded.get(name.rpartition(".")[0]), "tp_style", None)
        expected = ref_grads[name] if style is None else shard_tensor(ref_grads[name], style, groups.tp_rank, 2)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    destroy_process_groups()


@pytest.mark.slow
def test_tp2_x_sp2_on_4_ranks_matches_single_process():
    run_ranks(_tp_sp_worker, 4)
