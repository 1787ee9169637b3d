"""ldm.eval.metrics against hand-computed values and independent reference implementations."""

import math

import numpy as np
import pytest
import torch

from ldm.eval.metrics import (
    feature_statistics,
    frechet_distance,
    gaussian_window,
    mean_absolute_error,
    psnr,
    ssim,
    ssim_map,
)


def _images(seed: int, shape=(2, 3, 24, 20), dtype=torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- PSNR / MAE --------------------------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset_is_10_log10_of_one_over_delta_squared():
    a = torch.full((3, 3, 8, 8), 0.25)
    deltas = torch.tensor([0.1, 0.01, 0.5])
    b = a + deltas.view(3, 1, 1, 1)
    expected = 10 * torch.log10(1 / deltas**2)  # 20, 40, 6.0206 dB
    assert psnr(a, b).shape == (3,)
    torch.testing.assert_close(psnr(a, b), expected, rtol=1e-5, atol=1e-4)
    assert psnr(a, b)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_uses_data_range_and_per_image_mse():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 255.0  # one pixel off by the full range: MSE = 255² / 16
    b[1] = 3.0  # every pixel off by 3: MSE = 9
    got = psnr(a, b, data_range=255.0)
    assert got[0].item() == pytest.approx(10 * math.log10(16), abs=1e-4)
    assert got[1].item() == pytest.approx(10 * math.log10(255**2 / 9), abs=1e-4)
    assert psnr(a, a)[0].item() == math.inf


def test_mean_absolute_error_is_per_image():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] = 0.2
    b[1, 0] = -0.6  # one channel of three off by 0.6 → mean 0.2 too, but signed differences must not cancel
    b[1, 1] = 0.6
    torch.testing.assert_close(mean_absolute_error(a, b), torch.tensor([0.2, 0.4]))


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# --- SSIM --------------------------------------------------------------------------------------------------------


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. 2004 written out loop by loop for one (H, W) channel: every valid 11×11 window, Gaussian σ=1.5."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            wx, wy = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (g * wx).sum(), (g * wy).sum()
            vx, vy = (g * (wx - mx) ** 2).sum(), (g * (wy - my) ** 2).sum()
            cxy = (g * (wx - mx) * (wy - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one():
    a = _images(0)
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))


def test_ssim_window_is_a_normalised_11_tap_gaussian():
    w = gaussian_window(dtype=torch.float64)
    assert w.shape == (11,) and w.sum().item() == pytest.approx(1.0)
    assert (w[6] / w[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))


def test_ssim_of_a_constant_offset_is_the_luminance_term():
    """Flat images: σ = 0, so SSIM = (2μxμy + C1) / (μx² + μy² + C1) exactly, by hand."""
    a = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    b = a + 0.2
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.7 + c1) / (0.5**2 + 0.7**2 + c1)  # 0.945...
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_a_loop_reference_per_channel_then_averaged():
    a = _images(1, (1, 3, 16, 14))
    b = (a + 0.2 * _images(2, (1, 3, 16, 14))).clamp(0, 1)
    expected = np.mean([_ssim_reference(a[0, c].numpy(), b[0, c].numpy()) for c in range(3)])
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-10)
    assert ssim_map(a, b).shape == (1, 3, 6, 4)  # valid windows only


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a = _images(3, (2, 3, 32, 40))
    b = (a + 0.3 * (_images(4, (2, 3, 32, 40)) - 0.5)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(2):
        ref = metrics.structural_similarity(
            a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=0,
        )  # fmt: skip
        assert ours[i].item() == pytest.approx(ref, rel=1e-9)
    # float32 input is computed in float32, still close to the float64 reference
    torch.testing.assert_close(ssim(a.float(), b.float()), ours.float(), rtol=1e-4, atol=1e-5)


# --- Fréchet distance ------------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy():
    x = _images(5, (50, 6)).squeeze()
    mu, sigma = feature_statistics(x.view(50, 6))
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0))
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False))
    with pytest.raises(ValueError, match="N ≥ 2"):
        feature_statistics(torch.zeros(1, 6))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16)
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: singular covariances must not give NaN or a complex result
    mu, sigma = feature_statistics(feats[:5])
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    """Commuting covariances: d² = ‖μ1−μ2‖² + Σ_i (√a_i − √b_i)²."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0  # = 7
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_non_commuting_gaussians_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(1)
    m1, m2 = (torch.randn(5, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    s1, s2 = m1 @ m1.T + 0.1 * torch.eye(5), m2 @ m2.T + 0.1 * torch.eye(5)
    mu1, mu2 = torch.randn(5, generator=gen, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_1d_gaussians():
    """One dimension: d² = (μ1 − μ2)² + (σ1 − σ2)²."""
    d = frechet_distance(torch.tensor([2.0]), torch.tensor([[9.0]]), torch.tensor([-1.0]), torch.tensor([[1.0]]))
    assert d == pytest.approx(9 + 4)
