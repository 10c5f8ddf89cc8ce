"""PSNR, SSIM and FVD (issue 9, Evaluation): closed forms, the Fréchet distance
on synthetic Gaussian features, and the I3D plumbing with a local TorchScript
module standing in for the real I3D weights (which are never downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jobconfig.errors import ConfigError
from pretrain.evaluation.metrics import frechet_distance, fvd, gaussian_stats, load_i3d, psnr, ssim, to_unit


def test_psnr_closed_form():
    target = torch.zeros(2, 3, 16, 16)
    pred = torch.full_like(target, 0.1)  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 20.0]))
    assert psnr(target, target).min() >= 99


def test_ssim_identity_flat_closed_form_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # flat frames a and b: the variance term is c2/c2, the luminance term (2ab + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    flat = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert flat.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    mild = ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    strong = ssim(x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    assert (strong < mild).all() and (mild < 1).all()
    torch.testing.assert_close(ssim(x, strong := x.flip(0)), ssim(strong, x))


def test_to_unit_accepts_uint8_video_and_decoder_output():
    u8 = np.full((2, 4, 4, 3), 255, np.uint8)
    assert to_unit(u8).shape == (2, 3, 4, 4) and to_unit(u8).min() == 1.0
    assert to_unit(torch.full((1, 3, 2, 2), -1.0)).max() == 0.0


def test_frechet_distance_closed_form_for_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # a rotated pair: the distance is invariant to a common rotation of both Gaussians
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_from_sampled_features_converges():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 4))
    b = rng.normal(0.5, 2.0, size=(20000, 4))
    expected = 4 * 0.5 ** 2 + 4 * (1.0 - 2.0) ** 2
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(expected, rel=0.05)
    assert abs(frechet_distance(*gaussian_stats(a), *gaussian_stats(a))) < 1e-8


class _StubI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: same call convention, checks what it is given."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        assert x.dim() == 5 and x.shape[1] == 3, "videos must be [B, 3, T, H, W]"
        assert bool(x.min() >= -1.0) and bool(x.max() <= 1.0), "videos must be in [-1, 1]"
        return torch.stack([x.mean((1, 2, 3, 4)), x.std((1, 2, 3, 4)), x[:, 0].mean((1, 2, 3))], dim=1)


def test_fvd_with_a_local_torchscript_detector(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_StubI3D()).save(str(path))
    detector = load_i3d(path)
    g = torch.Generator().manual_seed(0)
    real = [torch.rand(9, 3, 16, 16, generator=g) for _ in range(6)]
    near = [(v + 0.01 * torch.randn(v.shape, generator=g)).clamp(0, 1) for v in real]
    far = [v * 0.5 for v in real]
    assert abs(fvd(detector, real, real)) < 1e-8
    assert 0 <= fvd(detector, real, near) < fvd(detector, real, far)
    with pytest.raises(ConfigError, match="does not exist"):
        load_i3d(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="not a TorchScript module"):
        load_i3d(tmp_path / "junk.pt")
