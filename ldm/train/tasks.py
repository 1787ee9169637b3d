"""The extra UNet inputs of inpainting and upscaling training (``ModelConfig.task``), as pure functions of tensors.

**inpaint** (SD's inpainting layout): the UNet sees cat([x_t (C), the mask at the latent size (1), the masked image's
latents (C)]). The mask is 1 where the model repaints; the masked image is image·(mask < 0.5) in [-1, 1] pixels, so
the repainted region is mid-grey; its latents are the VAE's posterior mean × scaling factor. The mask reaches the
latent size by nearest-neighbour interpolation, as diffusers' inpainting pipeline brings its mask there. Training
masks are random rectangles, brush strokes or the whole image (:func:`random_masks`); a full mask leaves only the
caption, so the model keeps generating from text alone.

**upscale**: the UNet sees cat([x_t (C), the low-resolution image's latents (C)]). The low-res image is the image
downsampled by the factor (bicubic, antialiased); its latents (posterior mean × scaling) are noised to a level L with
the model's own schedule, z_L = √ᾱ_L·z + √(1−ᾱ_L)·ε, at the low resolution, then upsampled (nearest) by the factor to
the latent size. L is the UNet's class label. Noising the conditioning image ("conditioning augmentation" of Ho et al.
2022, Cascaded Diffusion Models) teaches the model not to copy the low-res image's own defects; SD's x4 upscaler
trains with L uniform in [0, 350).

Randomness comes only from the generator passed in (None: the global torch RNG, which training checkpoints restore).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.models.presets import Task
from ldm.pipeline.modes import latent_mask
from ldm.train.distributed import BatchShard
from ldm.train.objectives import add_noise


@dataclass(frozen=True, kw_only=True)
class TaskInputConfig:
    """How the extra inputs of inpaint and upscale training are drawn (text_to_image runs ignore it)."""

    # inpaint: the share of samples given each kind of mask; the rest (when they sum below 1) are unmasked
    rectangle_masks: float = 0.375  # one to three rectangles
    stroke_masks: float = 0.375  # one to three brush strokes: thick random polylines
    full_masks: float = 0.25  # the whole image (SD's inpainting recipe: 25 %)
    # upscale: the low-res latents' noise level is uniform in [0, max_noise_level) (SD's x4 upscaler: 350); 1 = none
    max_noise_level: int = 350
    # The learning rate of the UNet's input convolution and noise-level embedding, over train.lr: their new inputs
    # start at zero and must grow from nothing while the rest of the UNet only adapts (at 1×, 600 steps left an
    # inpainting UNet's masked-image channels unused: its held-out error no lower with them than without)
    input_lr_scale: float = 10.0

    def __post_init__(self):
        rates = {"rectangle_masks": self.rectangle_masks, "stroke_masks": self.stroke_masks,
                 "full_masks": self.full_masks}  # fmt: skip
        for name, rate in rates.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"task_inputs.{name} must be a share in [0, 1], got {rate}")
        if sum(rates.values()) > 1 + 1e-9:
            raise ValueError(f"task_inputs' mask shares sum to {sum(rates.values()):g}, more than 1; lower one of them "
                             "(any rest of the samples is left unmasked)")  # fmt: skip
        if not 0 < self.input_lr_scale <= 1000:
            raise ValueError(f"task_inputs.input_lr_scale must be in (0, 1000], got {self.input_lr_scale}; try 10")
        if self.max_noise_level < 1:
            raise ValueError(f"task_inputs.max_noise_level must be at least 1 (1 = no noise augmentation), got "
                             f"{self.max_noise_level}; try 350")  # fmt: skip


# --- inpaint ---------------------------------------------------------------------------------------------------------


def random_masks(count: int, *, height: int, width: int, config: TaskInputConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """(count, 1, height, width) float32 masks of 0 and 1 (1 = repaint), each of one kind drawn with the shares of
    ``config``: rectangles, brush strokes, the full image, or (the rest) nothing. Rectangles and strokes never cover
    the whole image. Drawn on the CPU from ``generator``: first the kind, then the shapes."""
    masks = torch.zeros(count, 1, height, width)
    full, rectangles = config.full_masks, config.full_masks + config.rectangle_masks
    strokes = rectangles + config.stroke_masks
    for i in range(count):
        kind = float(torch.rand((), generator=generator))
        if kind < full:
            masks[i] = 1.0
        elif kind < rectangles:
            masks[i, 0] = rectangles_mask(height, width, generator=generator)
        elif kind < strokes:
            masks[i, 0] = strokes_mask(height, width, generator=generator)
    return masks


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def rectangles_mask(height: int, width: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(height, width) mask of one to three axis-aligned rectangles, each side 1/8 to 3/4 of the image's. No side
    spans the image, so a rectangle holds at most one of its four corners and three never cover it all."""
    mask = torch.zeros(height, width)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        h = round(_uniform(height / 8, height * 3 / 4, generator))
        w = round(_uniform(width / 8, width * 3 / 4, generator))
        h, w = min(max(h, 1), height - 1), min(max(w, 1), width - 1)
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        mask[top : top + h, left : left + w] = 1.0
    return mask


def strokes_mask(height: int, width: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(height, width) mask of one to three brush strokes: polylines of one to three segments, each segment 1/8 to 1/2
    of the shorter side S long in a random direction, S/16 to S/8 wide, kept inside the image. Nine such segments
    cover at most about 2/3 of S², so strokes never cover the image."""
    side = min(height, width)
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")  # pixel centres
    mask = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        radius = _uniform(side / 16, side / 8, generator) / 2
        y, x = _uniform(0, height, generator), _uniform(0, width, generator)
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            angle, length = _uniform(0, 2 * math.pi, generator), _uniform(side / 8, side / 2, generator)
            y2 = min(max(y + length * math.sin(angle), 0.0), float(height))
            x2 = min(max(x + length * math.cos(angle), 0.0), float(width))
            mask |= _segment_distance(yy, xx, (y, x), (y2, x2)) <= max(radius, 0.5)
            y, x = y2, x2
    return mask.float()


def _segment_distance(yy: torch.Tensor, xx: torch.Tensor, a: tuple[float, float],
                      b: tuple[float, float]) -> torch.Tensor:  # fmt: skip
    """(H, W) distance of each pixel centre (yy, xx) to the segment from ``a`` to ``b`` (each (y, x))."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    length2 = dy * dy + dx * dx
    along = ((yy - a[0]) * dy + (xx - a[1]) * dx) / length2 if length2 > 0 else torch.zeros_like(yy)
    along = along.clamp(0, 1)
    return torch.hypot(yy - (a[0] + along * dy), xx - (a[1] + along * dx))


def masked_image(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) signed pixels with the repainted region (mask ≥ 0.5) set to 0, mid-grey; mask (B, 1, H, W)."""
    return pixels * (mask < 0.5).to(pixels.dtype)


def inpaint_condition(mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """(B, 1 + C, h, w): the mask (B, 1, H, W) brought to the latent size as sampling brings it
    (:func:`ldm.pipeline.modes.latent_mask`: a cell is masked when any of its pixels is), then the masked image's
    latents (B, C, h, w): what the UNet sees after x_t."""
    factor = mask.shape[-1] // masked_latents.shape[-1]
    small = latent_mask(mask, factor).to(masked_latents)  # (B, 1, h, w)
    return torch.cat([small, masked_latents], dim=1)


# --- upscale ---------------------------------------------------------------------------------------------------------


def downsample(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) signed pixels → (B, 3, H/factor, W/factor): bicubic with antialiasing, clamped to [-1, 1]."""
    h, w = pixels.shape[-2:]
    small = F.interpolate(pixels.float(), size=(h // factor, w // factor), mode="bicubic", antialias=True,
                          align_corners=False)  # fmt: skip
    return small.clamp(-1, 1).to(pixels.dtype)


def upscale_condition(low_latents: torch.Tensor, *, factor: int, levels: torch.Tensor, noise: torch.Tensor,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, C, h, w): the low-res latents (B, C, h/factor, w/factor) noised to ``levels`` (B,) with ``noise`` (their
    shape), then upsampled (nearest) by ``factor``: what the UNet sees after x_t."""
    noisy = add_noise(low_latents, noise.to(low_latents), levels, alphas_cumprod)
    return F.interpolate(noisy, scale_factor=factor, mode="nearest")


# --- both ------------------------------------------------------------------------------------------------------------


@dataclass
class Condition:
    """A batch's task input: ``channels`` beside x_t (None: text_to_image) and the UNet's ``class_labels`` (upscale:
    the noise levels)."""

    channels: torch.Tensor | None = None  # (B, C', h, w)
    class_labels: torch.Tensor | None = None  # (B,) int64

    def rows(self, start: int, end: int) -> Condition:
        """Samples ``start`` to ``end`` of the batch."""
        return Condition(*(None if x is None else x[start:end] for x in (self.channels, self.class_labels)))

    def to(self, device: torch.device) -> Condition:
        return Condition(*(None if x is None else x.to(device) for x in (self.channels, self.class_labels)))

    @staticmethod
    def cat(parts: list[Condition]) -> Condition:
        """The batches ``parts`` as one."""
        return Condition(*(None if xs[0] is None else torch.cat(xs)
                           for xs in zip(*((p.channels, p.class_labels) for p in parts))))  # fmt: skip


def unet_input(x_t: torch.Tensor, condition: Condition) -> torch.Tensor:
    """(B, C + C', h, w): x_t, then the task's channels (SD's order)."""
    return x_t if condition.channels is None else torch.cat([x_t, condition.channels.to(x_t)], dim=1)


def make_condition(task: Task, pixels: torch.Tensor, *, encode: Callable[[torch.Tensor], torch.Tensor],
                   config: TaskInputConfig, upscale_factor: int, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator | None = None, shard: BatchShard = BatchShard()) -> Condition:  # fmt: skip
    """The task input of a batch of images (B, 3, H, W), signed pixels: ``encode`` maps signed pixels to scaled latent
    means. Draws (on the CPU, from ``generator``) the inpaint masks, or the upscale noise levels and then the noise,
    for the whole global batch of which ``pixels`` are this process's rows (``shard``), and keeps those rows."""
    if task is Task.TEXT_TO_IMAGE:
        return Condition()
    b, _, h, w = pixels.shape
    if task is Task.INPAINT:
        masks = random_masks(shard.global_count(b), height=h, width=w, config=config, generator=generator)
        mask = shard.local(masks).to(pixels.device)
        return Condition(channels=inpaint_condition(mask, encode(masked_image(pixels, mask))))
    low = encode(downsample(pixels, upscale_factor))  # (B, C, h/f, w/f)
    levels = shard.local(torch.randint(0, config.max_noise_level, (shard.global_count(b),), generator=generator))
    noise = shard.local(torch.randn(shard.global_shape(low.shape), generator=generator))
    channels = upscale_condition(low, factor=upscale_factor, levels=levels, noise=noise, alphas_cumprod=alphas_cumprod)
    return Condition(channels=channels, class_labels=levels.to(pixels.device))
