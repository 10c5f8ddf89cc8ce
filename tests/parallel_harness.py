"""Helpers for the multi-process parity tests: spawn ranks on loopback gloo, tiny model and batch.

`run_ranks(fn, n)` starts n processes (spawn: a forked child would inherit the
parent's OpenMP state), each with a gloo process group on 127.0.0.1 and one
intra-op thread, and runs `fn(rank, world_size, *args)`. An exception in any
rank fails the caller with that rank's traceback; the other ranks are
terminated by torch.multiprocessing rather than left waiting in a collective,
and the gloo timeout bounds any remaining wait.
"""
from __future__ import annotations

import os
import random
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.batch import Batch
from data.stage import random_partition
from jobconfig.loader import load_config
from pretrain.model.videogpt import build_model
from pretrain.training.objective import next_clip_loss, row_seed

LATENT_HW = (6, 2)  # 3 patches per frame: odd token counts, so sequences of odd length occur


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from parallel.device import init_process_group, select_device

    init_process_group(select_device("cpu"), timeout_s=120)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, args: tuple = ()) -> None:
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                       join=True, start_method="spawn")


def debug_setup(seed: int = 0):
    """(cfg, model, batch, row seeds): debug model in float32 with a live output head, random clip layout.

    The DiT head starts at zero, which would make every backbone gradient zero
    and any gradient parity trivially true; it is randomised here.
    """
    cfg = load_config(None, ["--model.attention=blockwise"])
    model = build_model(cfg.model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    frames = 5
    # row 0: two packed samples; row 1: one shorter sample plus a padding frame
    rng = random.Random(seed)
    for _ in range(100):
        layout = [[list(random_partition(n, rng)) for n in (3, 2)], [list(random_partition(4, rng))]]
        length = model.sequence(layout, LATENT_HW).src.shape[1]
        if length % 2:
            break
    latents = torch.randn(2, frames, cfg.model.latent_channels, *LATENT_HW, generator=g)
    seeds = [row_seed(seed, i) for i in range(2)]
    return cfg, model, Batch(latents, layout), seeds


def loss_and_grads(model, cfg, batch, seeds) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = next_clip_loss(model, batch, cfg.objective, seeds)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
