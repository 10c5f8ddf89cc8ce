"""Evaluation: video metrics (PSNR, SSIM, FVD), scores against the repeat-last-frame baseline,
held-out loss, and the figures people look at."""
