"""`vgpt train-debug`: a short real training run of a model on synthetic latents.

One process, plain PyTorch AdamW with the METHOD.md optimiser settings; prints
progress (step, loss, samples/s, ETA) and writes the loss curve as JSON and PNG.
It is the main job until the precompute farm, loader and DeepSpeed trainer land.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from orchestration.config import ConfigError, JobConfig, load_config
from pretrain.model import build_model
from pretrain.objective import next_clip_loss, row_seed
from pretrain.synthetic import moving_square_latents, synthetic_batches


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: JobConfig, quiet: bool = False) -> list[float]:
    """Run `cfg.train.steps` steps; return the per-step losses."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = pick_device(tc.device)
    model = build_model(cfg.model, device=device, seed=tc.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                            weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    videos = moving_square_latents(cfg.synthetic, cfg.model.latent_channels, seed=tc.seed)
    batches = synthetic_batches(videos, cfg.synthetic, tc.batch_size, seed=tc.seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, tc.steps + 1):
        batch = next(batches).to(device)
        seeds = [row_seed(tc.seed, (step - 1) * tc.batch_size + i) for i in range(tc.batch_size)]
        loss = next_clip_loss(model, batch, cfg.objective, seeds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if not quiet and (step % tc.log_every == 0 or step == 1 or step == tc.steps):
            elapsed = time.perf_counter() - start
            rate = step * tc.batch_size / elapsed
            eta = (tc.steps - step) * elapsed / step
            window = losses[-tc.log_every:]
            print(f"step {step:5d}/{tc.steps}  loss {sum(window) / len(window):.4f}  "
                  f"grad_norm {grad_norm:.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{rate:.1f} samples/s  ETA {eta:.0f}s", flush=True)
    return losses


def write_curve(losses: list[float], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "losses.json").write_text(json.dumps(losses))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set_xlabel("step"); ax.set_ylabel("next-clip diffusion loss"); ax.set_yscale("log")
    ax.set_title("debug model on synthetic moving squares")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt train-debug", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="job YAML (default: configs/debug.yaml)")
    args, overrides = parser.parse_known_args(argv)
    from orchestration.config import CONFIG_ROOT
    try:
        cfg = load_config(args.config or CONFIG_ROOT / "debug.yaml", overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    losses = train(cfg)
    first = sum(losses[:10]) / min(10, len(losses))
    last = sum(losses[-10:]) / min(10, len(losses))
    out = Path(cfg.train.out_dir)
    write_curve(losses, out)
    print(f"loss {first:.4f} -> {last:.4f} ({first / max(last, 1e-12):.1f}x lower); curve in {out}/loss.png")
    return 0
