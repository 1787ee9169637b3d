"""How well a VAE reconstructs images: PSNR, SSIM and MAE per image, and rFID on the features of an extractor.

The metrics (:mod:`ldm.eval.metrics`) are taken on [0, 1] images; the posterior mean is decoded, so a score is
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ldm.errors import LdmError
from ldm.eval.metrics import feature_statistics, frechet_distance, mean_absolute_error, psnr, ssim
from ldm.formats.bundle import Bundle
from ldm.images import SIZE_FLAGS, find_images, iter_batches, signed_to_unit
from ldm.models.tiling import DEFAULT_OVERLAP, reconstruct

SSIM_MIN_SIDE = 11  # the SSIM window

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] → (B, D)


@dataclass
class _Totals:
    """Running sums of per-image metrics and, for rFID, the features of originals and reconstructions."""

    psnr: float = 0.0
    ssim: float = 0.0
    mae: float = 0.0
    count: int = 0
    real: list[torch.Tensor] = field(default_factory=list)  # (B, D) features of the originals
    fake: list[torch.Tensor] = field(default_factory=list)  # (B, D) features of the reconstructions


def evaluate_batches(
    vae: AutoencoderKL, batches: Iterable[torch.Tensor], *, scaling_factor: float | None = None,
    tile: int | None = None, overlap: int = DEFAULT_OVERLAP, feature_extractor: FeatureExtractor | None = None,
    progress: bool = False, total: int | None = None,
) -> dict:  # fmt: skip
    """Reconstruct each (B, 3, H, W) batch in [-1, 1] and average the per-image metrics over all images.

    Returns ``dict(psnr=dB, ssim=, mae=, count=)`` (PSNR, SSIM and MAE on [0, 1] images; see :mod:`ldm.eval.metrics`),
    plus ``rfid`` — the Fréchet distance between the feature statistics of originals and reconstructions — when a
    ``feature_extractor`` ((B, 3, H, W) in [0, 1] → (B, D)) is given and there are at least two images. ``total``
    (images) sizes the progress bar. Deterministic: the posterior mean is decoded. ``scaling_factor`` defaults to
    the VAE's own ``config.scaling_factor`` (which a bundle's VAE carries; it cancels out of a reconstruction).
    """
    if scaling_factor is None:
        scaling_factor = vae.config.scaling_factor
    sums = _Totals()
    bar = tqdm(total=total, desc="reconstructing", unit="img", disable=not progress, leave=False)
    for pixels in batches:
        if min(pixels.shape[-2:]) < SSIM_MIN_SIDE:
            width, height = pixels.shape[-1], pixels.shape[-2]
            raise LdmError(f"images of {width}×{height} are too small for SSIM; resize with {SIZE_FLAGS}, N ≥ 16")
        recon = reconstruct(vae, pixels, scaling_factor=scaling_factor, tile=tile, overlap=overlap)
        real, fake = signed_to_unit(pixels), signed_to_unit(recon)  # (B, 3, H, W) in [0, 1]
        sums.psnr += psnr(real, fake).double().sum().item()
        sums.ssim += ssim(real, fake).double().sum().item()
        sums.mae += mean_absolute_error(real, fake).double().sum().item()
        sums.count += real.shape[0]
        if feature_extractor is not None:
            with torch.no_grad():
                sums.real.append(feature_extractor(real).double().cpu())  # (B, D)
                sums.fake.append(feature_extractor(fake).double().cpu())
        bar.update(real.shape[0])
    bar.close()
    if sums.count == 0:
        raise LdmError("no images to evaluate; pass a folder with PNG, JPEG or WebP images")
    n = sums.count
    result = {"psnr": sums.psnr / n, "ssim": sums.ssim / n, "mae": sums.mae / n, "count": n}
    if feature_extractor is not None and sums.count >= 2:
        mu1, sigma1 = feature_statistics(torch.cat(sums.real))
        mu2, sigma2 = feature_statistics(torch.cat(sums.fake))
        result["rfid"] = frechet_distance(mu1, sigma1, mu2, sigma2)
    return result


def evaluate_folder(
    bundle: Bundle, folder: str | Path, *, size: int | None = None, limit: int | None = None, batch_size: int = 8,
    device: torch.device | str | None = None, tile: int | None = None, overlap: int = DEFAULT_OVERLAP,
    feature_extractor: FeatureExtractor | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """Reconstruct every image in ``folder`` with ``bundle.vae``: ``dict(psnr=, ssim=, mae=, count=[, rfid=])``.

    Images are found by :func:`find_images`, converted to RGB, and resized/cropped to ``size``×``size`` when given.
    ``device``: where to run (the VAE is moved there); default: where the VAE is.
    """
    if batch_size < 1:
        raise LdmError(f"batch size must be at least 1, got {batch_size}")
    paths = find_images(folder, limit=limit)
    if device is not None:
        bundle.vae.to(device)
    return evaluate_batches(
        bundle.vae, iter_batches(paths, factor=bundle.config.vae.downsampling_factor, size=size, batch_size=batch_size),
        scaling_factor=bundle.config.vae.scaling_factor, tile=tile, overlap=overlap,
        feature_extractor=feature_extractor, progress=progress, total=len(paths),
    )  # fmt: skip


def load_inception_features(
    path: str | Path, *, device: torch.device | str = "cpu", resolution: int = 299
) -> FeatureExtractor:
    """A torchvision Inception-v3 state dict (safetensors) → (B, 3, H, W) in [0, 1] → (B, 2048) pool features.

    Images are resized to ``resolution``² (299, as FID does; at least 75) and mapped to [-1, 1], the input of
    torchvision's ``IMAGENET1K_V1`` weights (its ``transform_input``). These are not the TF-FID Inception weights
    of pytorch-fid, so the rFID is comparable only with rFIDs computed the same way.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torchvision.models import Inception3

    path = Path(path)
    if not path.is_file():
        raise LdmError(f"no feature extractor file {path}; pass a torchvision Inception-v3 state dict in safetensors")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LdmError(f"cannot read {path} as safetensors ({exc}); pass an Inception-v3 state dict") from None
    model = Inception3(aux_logits=any(k.startswith("AuxLogits.") for k in state), init_weights=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise LdmError(f"{path} is not a torchvision Inception-v3 state dict; pass inception_v3() weights") from None
    model.fc = torch.nn.Identity()  # keep the 2048-d average-pool features
    model.eval().to(device)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(device)  # (B, 3, H, W) in [0, 1]
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
        return model(x * 2 - 1)  # (B, 2048)

    return features
