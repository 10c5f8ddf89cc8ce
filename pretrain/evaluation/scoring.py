"""Scores of one predicted continuation against the ground truth, next to the
repeat-the-last-context-frame baseline.
"""
from __future__ import annotations

import numpy as np

from pretrain.evaluation.metrics import psnr, ssim, to_unit


def score(pred: np.ndarray, context: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR/SSIM per predicted frame with ground truth, and the repeat-last-context-frame baseline."""

    n = len(truth)
    if n == 0:
        return {}
    p, t = to_unit(pred[:n]), to_unit(truth)
    last = to_unit(np.repeat(context[-1:], n, axis=0))
    out = {"psnr": psnr(p, t).tolist(), "ssim": ssim(p, t).tolist(),
           "baseline_repeat_last": {"psnr": psnr(last, t).tolist(), "ssim": ssim(last, t).tolist()}}
    out["mean_psnr"] = float(np.mean(out["psnr"]))
    out["mean_ssim"] = float(np.mean(out["ssim"]))
    out["baseline_repeat_last"]["mean_psnr"] = float(np.mean(out["baseline_repeat_last"]["psnr"]))
    out["baseline_repeat_last"]["mean_ssim"] = float(np.mean(out["baseline_repeat_last"]["ssim"]))
    return out
