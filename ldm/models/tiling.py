"""A bundle's VAE on images and latents of any size: tiled when large, with an fp32 retry for half precision.

Pixels are (B, 3, H, W) in [-1, 1]; latents are (B, C, H/f, W/f) already multiplied by the bundle's scaling
factor, i.e. what the UNet sees (f: the VAE's downsampling factor, from its config).

Tiling: an image (encode) or latent (decode) larger than the tile size is cut into overlapping tiles on the
latent grid. Each tile is run on its own and the outputs are blended with linear ramps across each
overlap, the two ramps of an overlap summing to one, so there is no hard seam. Tiling is not exact: the VAE's
group norms and mid-block self-attention see the whole input, so a tile's output depends on what it cannot see;
the overlap hides the resulting mismatch instead of leaving a visible edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.errors import LdmError
from ldm.images import SIZE_FLAGS
from ldm.models.autoencoder import decode_latents, downsampling_factor

DEFAULT_TILE = 512  # pixels: the CLI tiles images with a side above this
DEFAULT_OVERLAP = 64  # pixels of overlap between neighbouring tiles


# --- tiles -------------------------------------------------------------------------------------------------------


def check_tiling(tile: int | None, overlap: int, *, factor: int) -> None:
    """Reject a tile size or overlap (pixels) that does not fit the latent grid of ``factor``-pixel cells."""
    if tile is None:
        return
    if tile < factor or tile % factor:
        fix = max(factor, tile // factor * factor)
        raise LdmError(f"tile size {tile} must be a positive multiple of {factor} pixels; try {fix}")
    if overlap < 0 or overlap % factor or 2 * overlap > tile:
        fix = min(max(0, overlap) // factor * factor, tile // 2 // factor * factor)
        raise LdmError(
            f"tile overlap {overlap} must be a multiple of {factor} from 0 to half the tile size ({tile}); try {fix}"
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


def _cells(tile: int | None, overlap: int, side: int, factor: int) -> tuple[int, int]:
    """Pixel tile settings → (tile, overlap) in latent cells of ``factor`` pixels; no tiling is one tile as large as
    the input (``side`` cells)."""
    check_tiling(tile, overlap, factor=factor)
    if tile is None:
        return side, 0
    return tile // factor, overlap // factor


@torch.no_grad()
def encode_posterior(
    vae: AutoencoderKL, pixels: torch.Tensor, *, tile: int | None = None, overlap: int = DEFAULT_OVERLAP
) -> DiagonalGaussianDistribution:
    """(B, 3, H, W) pixels in [-1, 1] → the posterior q(z|x) over unscaled (B, C, H/f, W/f) latents.

    Tiled (``tile`` pixels, ``overlap`` pixels) when a side exceeds ``tile``: the posterior's mean and log-variance
    are blended, so a sample drawn afterwards has the right variance in the overlaps too.
    """
    height, width = pixels.shape[-2:]
    factor = downsampling_factor(vae)
    if height % factor or width % factor:
        raise LdmError(f"image size {width}×{height} is not a multiple of {factor}; resize with {SIZE_FLAGS} or crop it")
    cells, over = _cells(tile, overlap, max(height, width) // factor, factor)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    params = run_tiled(
        lambda x: vae.encode(x).latent_dist.parameters, pixels, tile=cells, overlap=over, in_scale=factor, out_scale=1
    )  # (B, 2C, H/f, W/f): mean | log-variance
    return DiagonalGaussianDistribution(params)


def encode_images(
    vae: AutoencoderKL, pixels: torch.Tensor, *, scaling_factor: float, tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, 3, H, W) pixels in [-1, 1] → float32 (B, C, H/f, W/f) latents × ``scaling_factor``.

    The posterior mean (deterministic), or a sample from the posterior when a ``generator`` is given.
    ``scaling_factor`` is the bundle's ``config.vae.scaling_factor``; ``tile=None`` never tiles.
    """
    posterior = encode_posterior(vae, pixels, tile=tile, overlap=overlap)
    latents = posterior.mean if generator is None else posterior.sample(generator)  # (B, C, H/f, W/f)
    return latents * scaling_factor


@torch.no_grad()
def decode(
    vae: AutoencoderKL, latents: torch.Tensor, *, scaling_factor: float, tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> torch.Tensor:  # fmt: skip
    """(B, C, h, w) latents × ``scaling_factor`` → float32 (B, 3, f·h, f·w) images in [-1, 1].

    Tiled when f·h or f·w exceeds ``tile`` pixels. Each tile goes through
    :func:`ldm.models.autoencoder.decode_latents`, so a half-precision tile that overflows is redone in fp32 with a warning.
    """
    factor = downsampling_factor(vae)
    cells, over = _cells(tile, overlap, max(latents.shape[-2:]), factor)
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    images = run_tiled(
        lambda z: decode_latents(vae, z, scaling_factor=scaling_factor), latents, tile=cells, overlap=over,
        in_scale=1, out_scale=factor,
    )  # fmt: skip
    return images.clamp(-1, 1)  # (B, 3, f·h, f·w)


def reconstruct(
    vae: AutoencoderKL, pixels: torch.Tensor, *, scaling_factor: float, tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, 3, H, W) in [-1, 1] → float32 (B, 3, H, W) in [-1, 1]: decode(encode(pixels)), posterior mean by default."""
    latents = encode_images(vae, pixels, scaling_factor=scaling_factor, tile=tile, overlap=overlap, generator=generator)
    return decode(vae, latents, scaling_factor=scaling_factor, tile=tile, overlap=overlap)

