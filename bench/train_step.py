"""Stage-2 training step: ours vs the reference's way, same model and frames.

ours       precomputed latents (read from memory), block-wise clip attention
reference  the authors' scripts: encode every frame with the VAE inside the
           step (SDXL VAE architecture, random weights: same cost), then a
           dense L x L attention mask

Both run forward + backward + AdamW on the same model (default: sweep size s1,
width 128, 4 layers) over 48 frames with a random clip partition. Prints the
ratio of step times measured in this one run (goal >= 2x on CPU). Its VAE
(`random_vae`) and timer (`timed`) serve bench/gpu.py and bench/precompute.py too.

    python bench/train_step.py [--preset s1] [--frames 48] [--size 128] [--steps 3] [--vae sdxl|tiny]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.batch import Batch  # noqa: E402
from data.stage import random_partition  # noqa: E402
from data.vae import tiny_vae_kwargs  # noqa: E402
from jobconfig.loader import load_config  # noqa: E402
from pretrain.model.videogpt import build_model  # noqa: E402
from pretrain.training.objective import next_clip_loss, row_seed  # noqa: E402

# the SDXL VAE's architecture (its config.json)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, sample_size=1024)


def random_vae(architecture: str):
    """A frozen AutoencoderKL with random weights (the cost is the architecture's): "sdxl" or "tiny"."""
    from diffusers import AutoencoderKL  # optional heavy dependency (the precompute extra)

    kwargs = SDXL_VAE if architecture == "sdxl" else tiny_vae_kwargs()
    return AutoencoderKL(**kwargs).eval().requires_grad_(False)


def timed(fn, steps: int, warmup: int = 1, sync=lambda: None) -> float:
    """Mean seconds of `fn` over `steps` calls after `warmup` calls; `sync` drains the device at both
    ends of the timed region (CUDA kernels run asynchronously: bench/gpu.py)."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="s1")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, default=128, help="frame side in pixels (latent side = size/8)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vae", choices=["sdxl", "tiny"], default="sdxl")
    args = p.parse_args()
    torch.manual_seed(0)
    vae = random_vae(args.vae)
    frames = torch.rand(1, args.frames, 3, args.size, args.size) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(frames[0]).latent_dist.sample()[None] * vae.config.scaling_factor
    clips = [[list(random_partition(args.frames, random.Random(0)))]]

    def step_fn(attention: str, encode: bool):
        cfg = load_config(None, [f"--model.preset={args.preset}", f"--model.attention={attention}",
                                 "--model.dense_max_tokens=1000000"])
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            if encode:
                with torch.no_grad():
                    x1 = vae.encode(frames[0]).latent_dist.sample()[None] * vae.config.scaling_factor
            else:
                x1 = latents
            loss = next_clip_loss(model, Batch(x1, clips), cfg.objective, [row_seed(0, 0)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step, model

    ours_fn, model = step_fn("blockwise", encode=False)
    ref_fn, _ = step_fn("dense", encode=True)
    tokens = sum(model.sequence(clips, tuple(latents.shape[-2:])).lengths)
    ours = timed(ours_fn, args.steps)
    ref = timed(ref_fn, args.steps)
    dense_only, _ = step_fn("dense", encode=False)
    dense = timed(dense_only, args.steps)
    print(f"model {args.preset}, {args.frames} frames of {args.size}px, {len(clips[0][0])} clips, "
          f"{tokens} tokens, VAE {args.vae}")
    print(f"ours (latents + block-wise)      {ours * 1000:8.0f} ms/step")
    print(f"reference (VAE in step + dense)  {ref * 1000:8.0f} ms/step")
    print(f"  of which dense attention alone {dense * 1000:8.0f} ms/step (latents + dense mask)")
    print(f"speed-up ours vs reference = {ref / ours:.2f}x  (goal >= 2x); "
          f"from attention alone = {dense / ours:.2f}x")


if __name__ == "__main__":
    main()
