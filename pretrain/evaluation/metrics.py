"""Prediction quality: PSNR and SSIM per frame, FVD from a local I3D.

Frames are float [T, 3, H, W] in [0, 1] (what `to_unit` makes of decoded
[-1, 1] frames or uint8 video). PSNR is 10 log10(1 / MSE) with data range 1.
SSIM is Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, valid positions only, per channel, then averaged (the
convention of the TF and pytorch-msssim implementations most video-prediction
papers report).

FVD is the Fréchet distance between Gaussians fitted to I3D features of real
and generated videos. The I3D is the TorchScript file the community's FVD
code uses (`i3d_torchscript.pt`), loaded from a local path only: nothing is
downloaded at run time. It is called as that code calls it,
`detector(videos, rescale=False, resize=True, return_features=True)` with
videos [B, 3, T, H, W] in [-1, 1], and returns [B, 400] features.
`frechet_distance` is exact linear algebra in float64 (the matrix square
root through a symmetric eigendecomposition, which stays real and stable
for PSD covariances where `scipy.linalg.sqrtm` may return complex noise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobconfig.errors import ConfigError


def to_unit(frames) -> torch.Tensor:
    """uint8 [T, H, W, 3] or float [T, 3, H, W] in [-1, 1] -> float32 [T, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(frames)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] in [0, 1] -> [T] dB (capped at 100 dB for identical frames)."""
    _check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[T, C, H, W] in [0, 1] -> [T] mean SSIM per frame."""
    _check_pair(pred, target)
    T, C, H, W = pred.shape
    if min(H, W) < window:
        raise ValueError(f"ssim: frames of {H}x{W} are smaller than the {window}x{window} window")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    k = _gaussian_window(window, sigma).to(pred.device)[None, None].expand(C, 1, -1, -1)
    x, y = pred.double(), target.double()
    blur = lambda z: F.conv2d(z, k, groups=C)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two [T, C, H, W] tensors of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")


# ---------------------------------------------------------------- Fréchet / FVD
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features: expected [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = Tr((R S2 R)^(1/2)) with R = S1^(1/2): the inner matrix
    is symmetric PSD, so its square root has real non-negative eigenvalues.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r = _psd_sqrt(s1)
    inner = np.linalg.eigvalsh(r @ s2 @ r)
    tr_sqrt = float(np.sqrt(np.clip(inner, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def load_i3d(path: str | Path, device: str = "cpu"):
    """The TorchScript I3D at a local `path` (predict.i3d_path); a clear error if it is not there."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"predict.i3d_path: {p} does not exist; FVD needs a local TorchScript I3D "
                          "(e.g. i3d_torchscript.pt from the FVD reference code); it is never downloaded")
    try:
        return torch.jit.load(str(p), map_location=device).eval()
    except RuntimeError as e:
        raise ConfigError(f"predict.i3d_path: {p} is not a TorchScript module: {str(e).splitlines()[0]}") from None


@torch.no_grad()
def i3d_features(detector, videos: list[torch.Tensor], batch_size: int = 8) -> np.ndarray:
    """videos: [T, 3, H, W] in [0, 1] each (T >= the detector's minimum, 9 for I3D) -> [N, D] features."""
    feats = []
    for i in range(0, len(videos), batch_size):
        x = torch.stack(videos[i:i + batch_size]).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, T, H, W], [-1, 1]
        feats.append(detector(x, rescale=False, resize=True, return_features=True).double().cpu().numpy())
    return np.concatenate(feats)


def fvd(detector, real: list[torch.Tensor], fake: list[torch.Tensor]) -> float:
    """FVD between two sets of videos (each [T, 3, H, W] in [0, 1])."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"fvd: need at least 2 videos per set, got {len(real)} real and {len(fake)} generated")
    return frechet_distance(*gaussian_stats(i3d_features(detector, real)),
                            *gaussian_stats(i3d_features(detector, fake)))
