"""Image-reconstruction metrics (PSNR, SSIM, MAE), the Fréchet distance behind FID, KID and the CLIP score, as pure
tensor functions.

Images are (B, C, H, W) tensors with values in ``[0, data_range]`` (``data_range=1`` for [0, 1] images); every
image metric returns one value per image, shape (B,). Nothing here touches files, models or global state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# SSIM constants of Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity", §III.
SSIM_WINDOW = 11  # Gaussian window side
SSIM_SIGMA = 1.5  # Gaussian window standard deviation, pixels
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _float(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; everything else (uint8, fp16, bf16, fp32) is computed in float32."""
    return x if x.dtype == torch.float64 else x.float()


def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE = mean over (C, H, W) of (a − b)²; (B, C, H, W) × 2 → (B,)."""
    _check_pair(a, b)
    return (_float(a) - _float(b)).square().mean(dim=(1, 2, 3))


def mean_absolute_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MAE = mean over (C, H, W) of |a − b|; (B, C, H, W) × 2 → (B,)."""
    _check_pair(a, b)
    return (_float(a) - _float(b)).abs().mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, PSNR = 10·log10(data_range² / MSE); (B, C, H, W) × 2 → (B,).

    Identical images give +inf.
    """
    return 10.0 * torch.log10(data_range**2 / mean_squared_error(a, b))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, *, dtype=torch.float32) -> torch.Tensor:
    """(size,) 1-D Gaussian weights exp(−x²/2σ²) at integer offsets x ∈ [−size//2, size//2], summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return (w / w.sum()).to(dtype)


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, per channel, "valid" (no padding): (B, C, H, W) → (B, C, H−k+1, W−k+1)."""
    channels, k = x.shape[1], window.numel()
    rows = window.view(1, 1, 1, k).expand(channels, 1, 1, k)  # (C, 1, 1, k)
    cols = window.view(1, 1, k, 1).expand(channels, 1, k, 1)  # (C, 1, k, 1)
    return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)


def ssim_map(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Local SSIM, Wang et al. 2004 eq. (13), on "valid" windows: (B, C, H, W) × 2 → (B, C, H−10, W−10).

    SSIM(x, y) = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)), C1 = (K1·L)², C2 = (K2·L)²,
    with local means, variances and covariance weighted by an 11×11 Gaussian (σ = 1.5) and normalised by the
    window sum (population, not sample, covariance). Only windows lying wholly inside the image are kept.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, got {tuple(a.shape[-2:])}")
    a, b = _float(a), _float(b)
    window = gaussian_window(dtype=a.dtype).to(a.device)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    # One filter pass over the five moment images: (5B, C, H, W) → (5B, C, h, w).
    moments = _blur_valid(torch.cat([a, b, a * a, b * b, a * b]), window)
    mu_a, mu_b, aa, bb, ab = moments.chunk(5)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004), (B, C, H, W) × 2 → (B,).

    The mean of :func:`ssim_map` over the valid (unpadded) windows of every channel, i.e. computed per channel
    and averaged. Matches scikit-image's ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=...)``, which also drops the border where
    the window does not fit.
    """
    return ssim_map(a, b, data_range=data_range).mean(dim=(1, 2, 3))


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features → mean (D,) and sample covariance (D, D) (divided by N − 1, as ``numpy.cov``), in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"expected (N, D) features with N ≥ 2, got shape {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(dim=0)  # (D,)
    centred = x - mu  # (N, D)
    sigma = centred.T @ centred / (x.shape[0] - 1)  # (D, D)
    return mu, sigma


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite (D, D) matrix (negative round-off clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance² between N(mu1, sigma1) and N(mu2, sigma2): the FID formula.

    d² = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1 Σ2)^½)  (Dowson & Landau 1982; Heusel et al. 2017).
    tr((Σ1 Σ2)^½) is computed as tr((Σ1^½ Σ2 Σ1^½)^½), which has the same eigenvalues but is symmetric, so it
    needs only ``eigh`` in float64 and stays real for singular (rank-deficient) covariances. mu: (D,), sigma: (D, D).
    """
    mu1, mu2, sigma1, sigma2 = (t.detach().double().cpu() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"expected means (D,) and covariances (D, D) of one D, got {tuple(mu1.shape)}, {tuple(sigma1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    root1 = _psd_sqrt(sigma1)
    cross = root1 @ sigma2 @ root1  # (D, D), symmetric PSD, same spectrum as Σ1 Σ2
    trace_sqrt = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0))


# Kernel Inception Distance: Bińkowski et al. 2018, "Demystifying MMD GANs", §4 and appendix D.
KID_SUBSETS = 100  # subsets averaged over (their code's and torchmetrics' default)
KID_SUBSET_SIZE = 1000  # features per side in each subset (capped at the smaller set)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cubic polynomial kernel k(x, y) = (x·y / d + 1)³ of KID; (N, D) × (M, D) → (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012, eq. 3) under
    :func:`polynomial_kernel`; (N, D) × (M, D) → () with N, M ≥ 2.

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / N(N−1) + Σ_{i≠j} k(y_i, y_j) / M(M−1) − 2 Σ_{i,j} k(x_i, y_j) / NM.
    It can be slightly negative when the two distributions are alike.
    """
    n, m = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """KID (Bińkowski et al. 2018): :func:`mmd2_unbiased` averaged over random subsets; returns (mean, std).

    ``real`` (N, D) and ``fake`` (M, D) features. Each of ``subsets`` rounds draws min(``subset_size``, N, M)
    features from each side without replacement (a generator seeded with ``seed``: the same call gives the same
    number). The std is over subsets (0 for one subset).
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2 or subsets < 1:
        raise ValueError(f"KID needs at least 2 features a side and 1 subset, got {size} and {subsets}")
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack([
        mmd2_unbiased(
            real[torch.randperm(real.shape[0], generator=generator)[:size]],
            fake[torch.randperm(fake.shape[0], generator=generator)[:size]],
        )
        for _ in range(subsets)
    ])  # (subsets,)
    std = values.std(unbiased=False) if subsets > 1 else torch.zeros(())
    return float(values.mean()), float(std)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP score (Hessel et al. 2021, with w = 100 as in torchmetrics): 100 · max(cos(image, text), 0) per pair.

    ``image_features`` (N, E) and ``text_features`` (N, E), row i of each a pair, not necessarily normalised;
    returns (N,). Average it for the usual single number.
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"expected two (N, E) feature matrices, got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    cos = torch.nn.functional.cosine_similarity(image_features.double(), text_features.double(), dim=-1)  # (N,)
    return 100 * cos.clamp(min=0)
