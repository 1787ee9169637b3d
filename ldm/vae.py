"""Encode images to latents and back with a bundle's VAE, tiled for large images, and measure reconstructions.

    python -m ldm.vae encode a.png b.png -o latents.safetensors --size 256
    python -m ldm.vae decode latents.safetensors -o decoded/
    python -m ldm.vae roundtrip a.png -o roundtrip/          # original | reconstruction, PSNR and SSIM
    python -m ldm.vae eval held-out/ --limit 500 --json vae-eval.json

Pixels are (B, 3, H, W) in [-1, 1]; latents are (B, C, H/8, W/8) already multiplied by the bundle's scaling
factor, i.e. what the UNet sees. The metrics (:mod:`ldm.metrics`) are taken on [0, 1] images.

Tiling: an image (encode) or latent (decode) larger than the tile size is cut into overlapping tiles on the
8-pixel latent grid. Each tile is run on its own and the outputs are blended with linear ramps across each
overlap, the two ramps of an overlap summing to one, so there is no hard seam. Tiling is not exact: the VAE's
group norms and mid-block self-attention see the whole input, so a tile's output depends on what it cannot see;
the overlap hides the resulting mismatch instead of leaving a visible edge.
"""

from __future__ import annotations

import enum
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm

from ldm.autoencoder import decode_latents
from ldm.bundle import Bundle, load_bundle
from ldm.data.images import inspect_image, open_rgb
from ldm.errors import ArgumentParser, LdmError, run_cli
from ldm.io import atomic_write, save_tensors, write_json
from ldm.metrics import feature_statistics, frechet_distance, mean_absolute_error, psnr, ssim
from ldm.runtime import DTYPES, resolve_device, resolve_dtype

DEFAULT_MODEL = Path("models/emoji-tiny")
DEFAULT_TILE = 512  # pixels: the CLI tiles images with a side above this
DEFAULT_OVERLAP = 64  # pixels of overlap between neighbouring tiles
FACTOR = 8  # pixels per latent cell (AutoencoderConfig insists on a downsampling factor of 8)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
LATENTS_KEY = "latents"
LATENTS_FORMAT = "ldm-latents"
SSIM_MIN_SIDE = 11  # the SSIM window
SIZE_FLAGS = "--size N (python -m ldm.evaluate: --vae-size N)"  # the flags that resize images on the way in

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] → (B, D)


class MetaKey(str, enum.Enum):
    """safetensors metadata keys of a latents file (all values are strings)."""

    FORMAT = "format"
    SCALING_FACTOR = "scaling_factor"  # float: latents = raw VAE latents × this
    VAE_SHA256 = "vae_sha256"  # sha256 of the bundle's vae.safetensors
    SOURCES = "sources"  # JSON list of {"name", "width", "height"} (size before any resize)
    BUNDLE = "bundle"  # bundle name


def warn(message: str) -> None:
    """A one-line ``warning: ...`` on stderr (the CLI's warnings; library code uses :mod:`warnings`)."""
    print(f"warning: {message}", file=sys.stderr)


# --- tiles -------------------------------------------------------------------------------------------------------


def check_tiling(tile: int | None, overlap: int) -> None:
    """Reject a tile size or overlap (pixels) that does not fit the 8-pixel latent grid."""
    if tile is None:
        return
    if tile < FACTOR or tile % FACTOR:
        fix = max(FACTOR, tile // FACTOR * FACTOR)
        raise LdmError(f"tile size {tile} must be a positive multiple of {FACTOR} pixels; try {fix}")
    if overlap < 0 or overlap % FACTOR or 2 * overlap > tile:
        fix = min(max(0, overlap) // FACTOR * FACTOR, tile // 2 // FACTOR * FACTOR)
        raise LdmError(
            f"tile overlap {overlap} must be a multiple of {FACTOR} from 0 to half the tile size ({tile}); try {fix}"
        )


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``[0, length)`` with evenly spaced ``[start, end)`` tiles of side ``tile`` sharing ≥ ``overlap``.

    All in one unit (latent cells here). One tile if ``length <= tile``; otherwise the fewest tiles whose even
    spacing keeps every overlap at least ``overlap``, the first starting at 0 and the last ending at ``length``.
    """
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)
    return [(round(i * step), round(i * step) + tile) for i in range(count)]


def blend_weights(spans: Sequence[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """1-D blending weights of each tile, in output units (a tile of ``n`` cells has ``n·scale`` weights).

    Across the overlap of tiles ``i`` and ``i+1`` (``m`` output units) tile ``i+1`` ramps up as (k+1)/(m+1) and
    tile ``i`` down as (m−k)/(m+1), k = 0..m−1: linear, never zero, and summing to one. Elsewhere the weight is 1.
    """
    weights = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale, dtype=torch.float64)
        if i > 0:
            m = (spans[i - 1][1] - start) * scale  # overlap with the previous tile
            if m > 0:
                w[:m] *= torch.arange(1, m + 1, dtype=torch.float64) / (m + 1)
        if i < len(spans) - 1:
            m = (end - spans[i + 1][0]) * scale  # overlap with the next tile
            if m > 0:
                w[-m:] *= torch.arange(m, 0, -1, dtype=torch.float64) / (m + 1)
        weights.append(w)
    return weights


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int, in_scale: int,
    out_scale: int,
) -> torch.Tensor:  # fmt: skip
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the outputs; float32 (B, C', h·out_scale, w·out_scale).

    ``x``: (B, C, h·in_scale, w·in_scale) on a grid of h × w cells; ``tile`` and ``overlap`` in cells. ``fn`` maps
    an (B, C, a·in_scale, b·in_scale) tile to (B, C', a·out_scale, b·out_scale). The blended output is
    Σ w_t·fn(tile_t) / Σ w_t with separable weights from :func:`blend_weights`.
    """
    h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x).float()
    row_w, col_w = blend_weights(rows, out_scale), blend_weights(cols, out_scale)
    out = weight_sum = None
    for (top, bottom), wy in zip(rows, row_w, strict=True):
        for (left, right), wx in zip(cols, col_w, strict=True):
            piece = fn(x[..., top * in_scale : bottom * in_scale, left * in_scale : right * in_scale]).float()
            if out is None:  # (B, C', H', W') once the output channels are known
                out = piece.new_zeros((*piece.shape[:2], h * out_scale, w * out_scale))
                weight_sum = piece.new_zeros((h * out_scale, w * out_scale))
            weight = (wy[:, None] * wx[None, :]).to(piece)  # (a·out_scale, b·out_scale)
            region = (..., slice(top * out_scale, bottom * out_scale), slice(left * out_scale, right * out_scale))
            out[region] += piece * weight
            weight_sum[region[1:]] += weight
    return out / weight_sum


# --- encode / decode ---------------------------------------------------------------------------------------------


def _cells(tile: int | None, overlap: int, side: int) -> tuple[int, int]:
    """Pixel tile settings → (tile, overlap) in latent cells; no tiling is one tile as large as the input."""
    check_tiling(tile, overlap)
    if tile is None:
        return side, 0
    return tile // FACTOR, overlap // FACTOR


@torch.no_grad()
def encode_posterior(
    vae: AutoencoderKL, pixels: torch.Tensor, *, tile: int | None = None, overlap: int = DEFAULT_OVERLAP
) -> DiagonalGaussianDistribution:
    """(B, 3, H, W) pixels in [-1, 1] → the posterior q(z|x) over unscaled (B, C, H/8, W/8) latents.

    Tiled (``tile`` pixels, ``overlap`` pixels) when a side exceeds ``tile``: the posterior's mean and log-variance
    are blended, so a sample drawn afterwards has the right variance in the overlaps too.
    """
    height, width = pixels.shape[-2:]
    if height % FACTOR or width % FACTOR:
        raise LdmError(f"image size {width}×{height} is not a multiple of {FACTOR}; resize with {SIZE_FLAGS} or crop it")
    cells, over = _cells(tile, overlap, max(height, width) // FACTOR)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    params = run_tiled(
        lambda x: vae.encode(x).latent_dist.parameters, pixels, tile=cells, overlap=over, in_scale=FACTOR, out_scale=1
    )  # (B, 2C, H/8, W/8): mean | log-variance
    return DiagonalGaussianDistribution(params)


def encode_images(
    vae: AutoencoderKL, pixels: torch.Tensor, *, scaling_factor: float, tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, 3, H, W) pixels in [-1, 1] → float32 (B, C, H/8, W/8) latents × ``scaling_factor``.

    The posterior mean (deterministic), or a sample from the posterior when a ``generator`` is given.
    ``scaling_factor`` is the bundle's ``config.vae.scaling_factor``; ``tile=None`` never tiles.
    """
    posterior = encode_posterior(vae, pixels, tile=tile, overlap=overlap)
    latents = posterior.mean if generator is None else posterior.sample(generator)  # (B, C, H/8, W/8)
    return latents * scaling_factor


@torch.no_grad()
def decode(
    vae: AutoencoderKL, latents: torch.Tensor, *, scaling_factor: float, tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> torch.Tensor:  # fmt: skip
    """(B, C, h, w) latents × ``scaling_factor`` → float32 (B, 3, 8h, 8w) images in [-1, 1].

    Tiled when 8·h or 8·w exceeds ``tile`` pixels. Each tile goes through
    :func:`ldm.autoencoder.decode_latents`, so a half-precision tile that overflows is redone in fp32 with a warning.
    """
    cells, over = _cells(tile, overlap, max(latents.shape[-2:]))
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    images = run_tiled(
        lambda z: decode_latents(vae, z, scaling_factor=scaling_factor), latents, tile=cells, overlap=over,
        in_scale=1, out_scale=FACTOR,
    )  # fmt: skip
    return images.clamp(-1, 1)  # (B, 3, 8h, 8w)


def reconstruct(
    vae: AutoencoderKL, pixels: torch.Tensor, *, scaling_factor: float, tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, 3, H, W) in [-1, 1] → float32 (B, 3, H, W) in [-1, 1]: decode(encode(pixels)), posterior mean by default."""
    latents = encode_images(vae, pixels, scaling_factor=scaling_factor, tile=tile, overlap=overlap, generator=generator)
    return decode(vae, latents, scaling_factor=scaling_factor, tile=tile, overlap=overlap)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → float32 in [0, 1] on the CPU."""
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


# --- evaluation --------------------------------------------------------------------------------------------------


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

    Returns ``dict(psnr=dB, ssim=, mae=, count=)`` (PSNR, SSIM and MAE on [0, 1] images; see :mod:`ldm.metrics`),
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
        real, fake = to_unit(pixels), to_unit(recon)  # (B, 3, H, W) in [0, 1]
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


def find_images(folder: str | Path, *, limit: int | None = None) -> list[Path]:
    """PNG, JPEG and WebP files under ``folder`` (recursively), sorted by path, the first ``limit`` of them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"{folder} is not a folder; pass a folder of PNG, JPEG or WebP images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise LdmError(f"no PNG, JPEG or WebP images in {folder} (searched recursively); pass another folder")
    return paths[:limit] if limit is not None else paths


def iter_batches(paths: Sequence[Path], *, size: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) batches in [-1, 1] of consecutive same-sized images (at most ``batch_size`` each), in order."""
    batch: list[torch.Tensor] = []
    for path in paths:
        pixels, _ = load_image(path, size=size)  # (3, H, W)
        if batch and (len(batch) == batch_size or batch[0].shape != pixels.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(pixels)
    if batch:
        yield torch.stack(batch)


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
        bundle.vae, iter_batches(paths, size=size, batch_size=batch_size),
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


# --- files -------------------------------------------------------------------------------------------------------


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side → ``size`` (bicubic), then the centre ``size``×``size`` square."""
    width, height = image.size
    if min(width, height) != size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def check_size(size: int | None) -> None:
    if size is not None and (size < FACTOR or size % FACTOR):
        fix = max(FACTOR, size // FACTOR * FACTOR)
        raise LdmError(f"--size must be a positive multiple of {FACTOR}, got {size}; try {fix}")


def load_image(path: str | Path, *, size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file → float32 (3, H, W) in [-1, 1] and its (width, height) before any resize.

    Converted to RGB (alpha on white); with ``size``, resized and centre-cropped to ``size``×``size``.
    """
    path = Path(path)
    if not path.exists():
        raise LdmError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise LdmError(f"{path} is a folder; pass image files (or use `python -m ldm.vae eval {path}`)")
    info = inspect_image(path)
    if info.problem is not None:
        detail = f", {info.detail}" if info.detail else ""
        raise LdmError(f"{path} is not a usable image ({info.problem.value}{detail}); pass PNG, JPEG or WebP files")
    image = open_rgb(path)
    original = image.size
    if size is not None:
        check_size(size)
        image = fit_square(image, size)
    width, height = image.size
    if width % FACTOR or height % FACTOR:
        fix = f"{max(FACTOR, width // FACTOR * FACTOR)}×{max(FACTOR, height // FACTOR * FACTOR)}"
        raise LdmError(
            f"{path} is {width}×{height}, not a multiple of {FACTOR} on each side; resize with {SIZE_FLAGS} or crop to "
            f"{fix}"
        )
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    return pixels.float() / 127.5 - 1.0, original


def save_png(path: Path, image: torch.Tensor) -> Path:
    """(3, H, W) in [0, 1] → an 8-bit RGB PNG, written atomically."""
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
    return atomic_write(path, lambda tmp: Image.fromarray(array, mode="RGB").save(tmp, format="PNG"))


def output_names(sources: Sequence[str]) -> list[str]:
    """One PNG name per source, named after it (``cat.jpg`` → ``cat.png``); repeats get ``-1``, ``-2``, ..."""
    names, seen = [], set()
    for source in sources:
        stem, name, n = Path(source).stem or "image", "", 0
        while not name or name in seen:
            name = f"{stem}.png" if n == 0 else f"{stem}-{n}.png"
            n += 1
        seen.add(name)
        names.append(name)
    return names


def latents_metadata(bundle: Bundle, sources: Sequence[dict]) -> dict[str, str]:
    """The safetensors metadata that lets ``decode`` check and unscale a latents file."""
    return {
        MetaKey.FORMAT.value: LATENTS_FORMAT,
        MetaKey.SCALING_FACTOR.value: repr(float(bundle.config.vae.scaling_factor)),
        MetaKey.VAE_SHA256.value: bundle.manifest.get("files", {}).get("vae.safetensors", ""),
        MetaKey.SOURCES.value: json.dumps(list(sources)),
        MetaKey.BUNDLE.value: bundle.name,
    }


def read_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A latents file written by ``encode`` → (B, C, h, w) latents and its metadata (scaling factor checked)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LdmError(f"{path}: no such file; pass the .safetensors file that `python -m ldm.vae encode` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            latents = f.get_tensor(LATENTS_KEY) if LATENTS_KEY in keys else None
    except (SafetensorError, OSError) as exc:
        raise LdmError(
            f"{path} is not a readable safetensors file ({exc}); pass a file written by `python -m ldm.vae encode`"
        ) from None
    if latents is None or latents.dim() != 4:
        raise LdmError(
            f"{path} holds no (B, C, h, w) '{LATENTS_KEY}' tensor; pass a file written by `python -m ldm.vae encode`"
        )
    try:
        scale = float(metadata[MetaKey.SCALING_FACTOR.value])
    except (KeyError, ValueError):
        raise LdmError(
            f"{path} has no scaling_factor metadata, so its latents' scale is unknown; encode the images again with "
            "`python -m ldm.vae encode`"
        ) from None
    if not math.isfinite(scale) or scale <= 0:
        raise LdmError(f"{path} has an invalid scaling_factor {scale}; encode the images again")
    return latents, metadata


def _source_names(metadata: dict[str, str], count: int) -> list[str]:
    try:
        sources = json.loads(metadata.get(MetaKey.SOURCES.value, "[]"))
        names = [str(s["name"]) for s in sources]
    except (json.JSONDecodeError, TypeError, KeyError):
        names = []
    return names if len(names) == count else [f"{i:05d}.png" for i in range(count)]


# --- command line ------------------------------------------------------------------------------------------------


class Command(str, enum.Enum):
    """The subcommands."""

    ENCODE = "encode"
    DECODE = "decode"
    ROUNDTRIP = "roundtrip"
    EVAL = "eval"


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap in pixels; ``tile=None`` never tiles."""

    tile: int | None
    overlap: int


def build_parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"bundle folder (default: {DEFAULT_MODEL})")
    common.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    common.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="VAE weights and activations")
    common.add_argument("--tile-size", type=int, default=DEFAULT_TILE, metavar="PX",
                        help=f"images with a side above PX pixels are processed in PX×PX tiles "
                        f"(default {DEFAULT_TILE}); a smaller PX forces tiling, 0 turns it off")  # fmt: skip
    common.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP, metavar="PX",
                        help=f"overlap of neighbouring tiles, blended (default {DEFAULT_OVERLAP})")  # fmt: skip
    common.add_argument("--batch-size", type=int, default=8, help="images per VAE batch (default 8)")
    sized = ArgumentParser(add_help=False)
    sized.add_argument("--size", type=int, default=None, metavar="N",
                       help="resize the shorter side to N and centre-crop N×N (multiple of 8)")  # fmt: skip

    parser = ArgumentParser(prog="python -m ldm.vae", description="Encode, decode and evaluate with a bundle's VAE.")
    sub = parser.add_subparsers(dest="command", required=True)
    encode = sub.add_parser(Command.ENCODE.value, parents=[common, sized], help="images → a latents .safetensors file")
    encode.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    encode.add_argument("-o", "--output", type=Path, required=True, help="latents file to write (.safetensors)")
    dec = sub.add_parser(Command.DECODE.value, parents=[common], help="a latents file → PNGs")
    dec.add_argument("latents", type=Path)
    dec.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs")
    trip = sub.add_parser(Command.ROUNDTRIP.value, parents=[common, sized], help="original | reconstruction PNGs")
    trip.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    trip.add_argument("-o", "--output", type=Path, required=True, help="folder for the side-by-side PNGs")
    ev = sub.add_parser(Command.EVAL.value, parents=[common, sized], help="mean PSNR, SSIM, MAE (and rFID) of a folder")
    ev.add_argument("folder", type=Path, metavar="DIR")
    ev.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by path)")
    ev.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    ev.add_argument("--features", type=Path, default=None, metavar="FILE",
                    help="torchvision Inception-v3 state dict (safetensors) for rFID")  # fmt: skip
    return parser


def _check_args(args) -> Tiling:
    if args.batch_size < 1:
        raise LdmError(f"--batch-size must be at least 1, got {args.batch_size}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise LdmError(f"--limit must be at least 1, got {args.limit}")
    check_size(getattr(args, "size", None))
    if args.tile_size < 0:
        raise LdmError(f"--tile-size must be 0 (no tiling) or a multiple of {FACTOR}, got {args.tile_size}")
    tiling = Tiling(tile=args.tile_size or None, overlap=args.tile_overlap if args.tile_size else 0)
    check_tiling(tiling.tile, tiling.overlap)
    return tiling


def _load_vae_bundle(args) -> Bundle:
    bundle = load_bundle(args.model)
    device = resolve_device(args.device)
    bundle.vae.to(device=device, dtype=resolve_dtype(args.dtype, device))
    return bundle


def _load_images(paths: Sequence[Path], size: int | None) -> tuple[list[torch.Tensor], list[dict]]:
    """Every image as (3, H, W) in [-1, 1], and its source record {name, width, height}."""
    images, sources = [], []
    for path in paths:
        pixels, (width, height) = load_image(path, size=size)
        images.append(pixels)
        sources.append({"name": path.name, "width": width, "height": height})
    return images, sources


def _encode(args, tiling: Tiling) -> None:
    images, sources = _load_images(args.images, args.size)
    odd = next((i for i, p in enumerate(images) if p.shape != images[0].shape), None)
    if odd is not None:
        (h0, w0), (h1, w1) = images[0].shape[-2:], images[odd].shape[-2:]
        raise LdmError(
            f"images differ in size ({sources[0]['name']} is {w0}×{h0}, {sources[odd]['name']} is {w1}×{h1}); "
            "pass --size N to resize them all to N×N"
        )
    bundle = _load_vae_bundle(args)
    pixels = torch.stack(images)  # (N, 3, H, W)
    scale = bundle.config.vae.scaling_factor
    chunks = [
        encode_images(bundle.vae, batch, scaling_factor=scale, tile=tiling.tile, overlap=tiling.overlap).cpu()
        for batch in tqdm(pixels.split(args.batch_size), desc="encoding", leave=False)
    ]
    latents = torch.cat(chunks)  # (N, C, H/8, W/8)
    save_tensors(args.output, {LATENTS_KEY: latents}, metadata=latents_metadata(bundle, sources))
    print(f"wrote {args.output}: {len(images)} latents of shape {tuple(latents.shape[1:])}, scaling factor {scale:g}")


def _decode(args, tiling: Tiling) -> None:
    latents, metadata = read_latents(args.latents)
    bundle = _load_vae_bundle(args)
    expected = bundle.config.vae.latent_channels
    if latents.shape[1] != expected:
        raise LdmError(
            f"{args.latents} holds {latents.shape[1]}-channel latents but the VAE of {args.model} takes {expected}; "
            "pass the bundle that encoded them"
        )
    ours = bundle.manifest.get("files", {}).get("vae.safetensors", "")
    theirs = metadata.get(MetaKey.VAE_SHA256.value, "")
    if theirs != ours:
        warn(
            f"{args.latents} was encoded by a different VAE (sha256 {theirs[:12] or 'unknown'}, bundle "
            f"{metadata.get(MetaKey.BUNDLE.value, '?')}) than {args.model}'s ({ours[:12]}); the images may be wrong"
        )
    scale = float(metadata[MetaKey.SCALING_FACTOR.value])  # unscale with the factor the latents were scaled by
    if scale != bundle.config.vae.scaling_factor:
        ours_scale = bundle.config.vae.scaling_factor
        warn(f"{args.latents} was scaled by {scale:g}, {args.model}'s VAE uses {ours_scale:g}; unscaling by {scale:g}")
    names = output_names(_source_names(metadata, latents.shape[0]))
    args.output.mkdir(parents=True, exist_ok=True)
    done = 0
    for batch in tqdm(latents.split(args.batch_size), desc="decoding", leave=False):
        images = to_unit(decode(bundle.vae, batch, scaling_factor=scale, tile=tiling.tile, overlap=tiling.overlap))
        for image in images:
            save_png(args.output / names[done], image)
            done += 1
    print(f"wrote {done} PNGs to {args.output}")


def _roundtrip(args, tiling: Tiling) -> None:
    images, sources = _load_images(args.images, args.size)
    bundle = _load_vae_bundle(args)
    args.output.mkdir(parents=True, exist_ok=True)
    for pixels, name, source in zip(images, output_names([s["name"] for s in sources]), sources, strict=True):
        recon = reconstruct(
            bundle.vae, pixels[None], scaling_factor=bundle.config.vae.scaling_factor, tile=tiling.tile,
            overlap=tiling.overlap,
        )  # fmt: skip
        real, fake = to_unit(pixels[None]), to_unit(recon)  # (1, 3, H, W) in [0, 1]
        save_png(args.output / name, torch.cat([real, fake], dim=-1)[0])  # (3, H, 2W): original | reconstruction
        quality = f"PSNR {psnr(real, fake).item():.2f} dB"
        if min(real.shape[-2:]) >= SSIM_MIN_SIDE:
            quality += f", SSIM {ssim(real, fake).item():.4f}"
        print(f"{source['name']}: {quality} → {args.output / name}")


def _eval(args, tiling: Tiling) -> None:
    find_images(args.folder, limit=args.limit)  # bad folder: fail before loading the model
    bundle = _load_vae_bundle(args)
    features = None
    if args.features is not None:
        features = load_inception_features(args.features, device=bundle.vae.device)
    result = evaluate_folder(
        bundle, args.folder, size=args.size, limit=args.limit, batch_size=args.batch_size, tile=tiling.tile,
        overlap=tiling.overlap, feature_extractor=features,
    )  # fmt: skip
    print(f"images: {result['count']}")
    print(f"PSNR: {result['psnr']:.2f} dB")
    print(f"SSIM: {result['ssim']:.4f}")
    print(f"MAE: {result['mae']:.4f}")
    if "rfid" in result:
        print(f"rFID: {result['rfid']:.3f}")
    elif features is not None:
        print("rFID: skipped (needs at least 2 images)")
    else:
        print("rFID: skipped (no feature extractor; pass --features FILE)")
    if args.json is not None:
        write_json(args.json, {"rfid": None, **result, "model": str(args.model), "folder": str(args.folder)})
        print(f"wrote {args.json}")


COMMANDS = {Command.ENCODE: _encode, Command.DECODE: _decode, Command.ROUNDTRIP: _roundtrip, Command.EVAL: _eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tiling = _check_args(args)
    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise here
    COMMANDS[Command(args.command)](args, tiling)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
