"""Pictures people look at: prediction strips, per-frame metric plots, loss curves (PNG).

Matplotlib with the Agg backend (no display needed); strips are plain PIL
mosaics so that a frame's pixels are shown unscaled and unsmoothed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_strip(rows: list[tuple[str, np.ndarray]], path: str | Path, scale: int = 2) -> Path:
    """One labelled row per (label, uint8 [T, H, W, 3] frames); rows may differ in length."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    label_w, gap = 110, 2
    cols = max(len(f) for _, f in rows)
    canvas = Image.new("RGB", (label_w + cols * (w * scale + gap), len(rows) * (h * scale + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, frames) in enumerate(rows):
        y = r * (h * scale + gap)
        draw.text((4, y + h * scale // 2 - 6), label, fill=(0, 0, 0))
        for c, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w * scale + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_per_frame(series: dict[str, list[float]], ylabel: str, path: str | Path, title: str = "") -> Path:
    """Lines of a metric against the predicted frame index (1 = first generated frame)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("predicted frame")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(metrics_files: list[Path], path: str | Path) -> Path:
    """Training loss of every stage on one global step axis, stages coloured and labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    offset = 0
    for f in metrics_files:
        rows = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        if not rows:
            continue
        by_step = {r["step"]: r["loss"] for r in rows}  # a resumed run rewrites steps: keep the last
        steps = sorted(by_step)
        ax.plot([offset + s for s in steps], [by_step[s] for s in steps], label=rows[0].get("stage", f.parent.name))
        offset += steps[-1]
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("next-clip loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
