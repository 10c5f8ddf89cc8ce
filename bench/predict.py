"""Video prediction: KV-cached generation vs recomputing the whole sequence at every Euler step.

A model of a sweep size (default s2) continues a context of latents the size
of a 256x256 frame (32x32 latent, 256 patches per frame) with next-frame clips,
guidance on (two branches per step), in a window that first grows and then
slides. Both ways give the same frames (tests/test_predict.py checks it); this
prints how much work the cache saves, measured in this one run:
    time  recompute / kv-cache            (the cache's speed-up)
    frames generated per second, each way

    python bench/predict.py [--preset s2] [--context 8] [--generate 4] [--steps 10] [--window 12]
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    from jobconfig.loader import load_config
    from jobconfig.predict import PredictConfig
    from pretrain.inference.sampler import NextClipPredictor
    from pretrain.model.videogpt import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="s2")
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--generate", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, default=12)
    ap.add_argument("--latent", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(None, [f"--model.preset={args.preset}", "--model.attention=blockwise"]).model
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.02)
    context = torch.randn(args.context, cfg.latent_channels, args.latent, args.latent)
    patches = (args.latent // cfg.patch_size) ** 2
    print(f"model {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"{patches} patches/frame, context {args.context}, generate {args.generate} frames, "
          f"{args.steps} Euler steps x 2 guidance branches, window {args.window} frames")
    times, outs = {}, {}
    for kv in (True, False):
        # next-frame generation (clips of 1), as the README reports it, not the reference's 24-frame default
        predictor = NextClipPredictor(model, PredictConfig(steps=args.steps, max_frame_window=args.window,
                                                           clip_frames=1, kv_cache=kv))
        t0 = time.perf_counter()
        outs[kv] = predictor.predict(context, args.generate)
        times[kv] = time.perf_counter() - t0
        print(f"  {'kv-cache ' if kv else 'recompute'}: {times[kv]:7.2f} s  "
              f"{args.generate / times[kv]:.3f} frames/s  {predictor.stats}")
    diff = (outs[True] - outs[False]).abs().max().item()
    print(f"recompute / kv-cache time: {times[False] / times[True]:.2f}x   (max |difference| {diff:.2e})")


if __name__ == "__main__":
    main()
