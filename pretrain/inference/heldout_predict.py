"""Predictions of held-out videos during training (eval.predict_every): what a run's model makes of
videos it never trained on, seen while the stage runs instead of after it.

Each time, the last clip of eval.predict_samples held-out samples (those of the evaluation,
pretrain/evaluation/latent_eval.py: the same frames and clip partition every time) is predicted
from the frames before it with the KV-cache sampler (pretrain/inference/sampler.py) at
eval.predict_steps Euler steps, decoded with the dataset's VAE (its plan.json, as `vgpt predict`
finds it), scored against the truth and the repeat-the-last-frame baseline (PSNR/SSIM,
pretrain/evaluation/scoring.py), and drawn as one strip: per video, context then prediction, and
context then truth. The history between clips stays in latents (predict.history: latent, no VAE
round trip before each clip as `vgpt predict` makes by default): the held-out samples are latents
(the posterior mean), and a prediction inside a training step should cost the model's time only.
The model runs in whatever dtype training holds it in (predict.dtype is `vgpt predict`'s). Rank 0
only, on the plain model (every weight on one rank: ZeRO <= 2, no TP/SP, checked by the config);
the model's mode and torch's global RNG are restored, so training goes on as without it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.vae import LatentVae
from data.video import to_uint8
from jobconfig.job import JobConfig
from pretrain.evaluation.figures import write_strip
from pretrain.evaluation.latent_eval import HeldOutSample
from pretrain.evaluation.scoring import score
from pretrain.inference.pipeline import resolve_recipe
from pretrain.inference.sampler import NextClipPredictor

PREDICTIONS_DIR = "predictions"  # in the run's out_dir: one strip per prediction step
CONTEXT_SHOWN = 4                # context frames drawn before each prediction


class HeldOutPredictor:
    def __init__(self, job: JobConfig, samples: list[HeldOutSample], out_dir: Path, device: torch.device):
        ec = job.eval
        self.samples = [s for s in samples if len(s.clips) > 1][:ec.predict_samples]  # a context to start from
        root = ec.root or job.data.blend()[0].root
        recipe = resolve_recipe({"data_root": root, "data_storage_options": job.data.storage_options})
        self.vae = LatentVae(recipe.vae, device=str(device))
        self.cfg = dataclasses.replace(job.predict, steps=ec.predict_steps, history="latent")
        self.out = Path(out_dir) / PREDICTIONS_DIR

    def predict(self, model, step: int) -> tuple[dict[str, float], np.ndarray | None]:
        """({heldout_pred_psnr, ..._ssim, ..._baseline_psnr, ..._baseline_ssim}, the strip as uint8 HWC);
        also writes the strip to <out_dir>/predictions/step_<step>.png."""
        if not self.samples:
            return {}, None
        was_training, cpu_rng = model.training, torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            predictor = NextClipPredictor(model, self.cfg)  # puts the model in eval mode
            rows, scores = [], []
            for s in self.samples:
                n = s.clips[-1]
                pred = predictor.predict(s.latents[:-n], n)
                context, truth, made = (to_uint8(self.vae.decode(x)) for x in (s.latents[:-n], s.latents[-n:], pred))
                scores.append(score(made, context, truth))
                shown = context[-CONTEXT_SHOWN:]
                rows += [(f"{s.key[:11]} pred", np.concatenate([shown, made])),
                         (f"{s.key[:11]} truth", np.concatenate([shown, truth]))]
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            model.train(was_training)
        path = write_strip(rows, self.out / f"step_{step:08d}.png")
        with Image.open(path) as im:
            strip = np.asarray(im.convert("RGB"))
        mean = lambda f: float(np.mean([f(x) for x in scores]))  # noqa: E731
        return {"heldout_pred_psnr": mean(lambda x: x["mean_psnr"]),
                "heldout_pred_ssim": mean(lambda x: x["mean_ssim"]),
                "heldout_pred_baseline_psnr": mean(lambda x: x["baseline_repeat_last"]["mean_psnr"]),
                "heldout_pred_baseline_ssim": mean(lambda x: x["baseline_repeat_last"]["mean_ssim"])}, strip


def make_predictor(job: JobConfig, samples: list[HeldOutSample], out_dir: Path,
                   device: torch.device) -> HeldOutPredictor:
    return HeldOutPredictor(job, samples, out_dir, device)
