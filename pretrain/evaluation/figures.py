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
    ax.set_title(title)
    return _finish(plt, fig, ax, "predicted frame", ylabel, path)


def read_loss_curve(metrics_file: str | Path) -> dict[int, float]:
    """step -> loss from a trainer's metrics.jsonl; a resumed run rewrites steps, the last line wins."""
    rows = (json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip())
    return {r["step"]: r["loss"] for r in rows}


def read_heldout_curve(metrics_file: str | Path) -> dict[int, dict[str, float]]:
    """step -> {heldout_loss, heldout_loss_t<t>...} of the evaluation steps of a trainer's metrics.jsonl."""
    rows = (json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip())
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("heldout_loss")}
            for r in rows if "heldout_loss" in r}


def plot_loss_curves(curves: dict[str, dict[int, float]], path: str | Path,
                     heldout: dict[str, dict[int, float]] | None = None) -> Path:
    """Training loss of every stage (name -> step -> loss, in order) on one global step axis, and
    next to it the held-out loss of the stages that evaluated (name -> step -> loss; markers)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    offset = 0
    for stage, by_step in curves.items():
        if not by_step:
            continue
        steps = sorted(by_step)
        line, = ax.plot([offset + s for s in steps], [by_step[s] for s in steps], label=stage)
        if held := (heldout or {}).get(stage):
            at = sorted(held)
            ax.plot([offset + s for s in at], [held[s] for s in at], marker="D", markersize=5, linestyle="--",
                    linewidth=1.5, color="black", markerfacecolor=line.get_color(), label=f"{stage} held-out",
                    zorder=3)
        offset += steps[-1]
    ax.set_yscale("log")
    return _finish(plt, fig, ax, "step (stages in order)", "next-clip loss", path)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, path: str | Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
