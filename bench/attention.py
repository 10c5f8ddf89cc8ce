"""Clip attention on a stage-4 token sequence: block-wise vs the dense-mask reference,
under the reference's rule (frame-causal clean stream, roles inside frames and noisy clips).

80 frames at 220 patches per frame (a 320x176 frame), a random clip partition
(K ~ U{2..80}), so about 35k tokens (every frame copy P + 2 tokens); heads and width are scaled down for CPU
but the token sequence is the real one. Each measurement runs in a fresh
subprocess so peak RSS is its own. Prints ratios measured in this one run:
    time  (forward+backward) dense / blockwise       goal >= 1.5x
    peak memory above baseline, dense / blockwise
    mask memory: dense bool [L, L] vs FlexAttention BlockMask vs block-wise plan  goal >= 100x

    python bench/attention.py [--frames 80] [--heads 2] [--head-dim 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time


def random_clips(frames: int, seed: int) -> list[list[list[int]]]:
    """One row of `frames` frames cut into random clips (the sampler's `random` clip policy)."""
    from data.stage import random_partition

    return [[list(random_partition(frames, random.Random(seed)))]]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(backend: str, args) -> dict:
    import torch

    from pretrain.model.attention import ClipMeta, blockwise_attention, dense_attention, flex_block_mask
    from pretrain.model.sequence import build_sequence

    torch.manual_seed(0)
    seq = build_sequence(random_clips(args.frames, args.seed), 220, max_tokens=2_000_000)
    meta = ClipMeta.of(seq)
    L = seq.seq_len
    q, k, v = (torch.randn(1, args.heads, L, args.head_dim, requires_grad=True) for _ in range(3))
    base = rss_mb()
    out = {"tokens": L, "clips": len(seq.clips[0][0])}
    if backend == "flex_mask":
        bm = flex_block_mask(meta, compile=False)
        tensors = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                   bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]
        out["mask_bytes"] = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return out
    fn = blockwise_attention if backend == "blockwise" else (lambda q, k, v, m: dense_attention(q, k, v, m, 10**9))
    t0 = time.perf_counter()
    o = fn(q, k, v, meta)
    o.backward(torch.ones_like(o))
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb_above_base"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if backend == "dense":
        out["mask_bytes"] = meta._cache["dense"].numel()
    else:
        plans = meta._cache["blockwise"]
        out["mask_bytes"] = sum(3 * p.key_perm.numel() * 8 + sum(s.mask.numel() for s in p.segments
                                                               if s.mask is not None) for p in plans)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    res = {}
    for backend in ("blockwise", "dense", "flex_mask"):
        cmd = [sys.executable, __file__, "--worker", backend, "--frames", str(args.frames), "--heads",
               str(args.heads), "--head-dim", str(args.head_dim), "--seed", str(args.seed)]
        res[backend] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{backend:10s} {res[backend]}", flush=True)
    b, d, f = res["blockwise"], res["dense"], res["flex_mask"]
    print(f"\nstage-4 sequence: {b['tokens']} tokens, {b['clips']} clips, heads={args.heads}, head_dim={args.head_dim}")
    print(f"attention fwd+bwd time   dense/blockwise = {d['seconds'] / b['seconds']:.2f}x  (goal >= 1.5x)")
    print(f"peak memory above base   dense/blockwise = {d['peak_mb_above_base'] / max(b['peak_mb_above_base'], 1):.1f}x "
          f"({d['peak_mb_above_base']:.0f} MB vs {b['peak_mb_above_base']:.0f} MB)")
    print(f"mask memory  dense/flex BlockMask = {d['mask_bytes'] / f['mask_bytes']:.0f}x "
          f"({d['mask_bytes'] / 2**20:.0f} MB vs {f['mask_bytes'] / 2**20:.2f} MB; goal >= 100x)")
    print(f"mask memory  dense/blockwise plan = {d['mask_bytes'] / b['mask_bytes']:.0f}x "
          f"({b['mask_bytes'] / 2**20:.2f} MB)")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    main()
