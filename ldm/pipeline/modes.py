"""The image inputs of the sampling loop, as small pieces it calls at fixed points: img2img, inpainting (with any
model, and with a dedicated inpainting UNet) and latent upscaling.

The loop (:func:`ldm.pipeline.text_to_image.generate`) asks :func:`start` for its first latents and the timesteps to
run, gives each UNet input to :meth:`ImageInputs.model_input`, each stepped latent to :meth:`ImageInputs.after_step`,
and the decoded pixels to :meth:`ImageInputs.finish`. Text-to-image is the case with no image inputs, where each
piece passes its argument through.

- **img2img** (SDEdit, Meng et al. 2022): the image's latents are noised to the step that ``strength`` selects and
  only the remaining steps run; strength 1 starts from pure noise, as text-to-image does, and ignores the image;
  strength 0 runs no step and returns the image's VAE round trip.
- **inpainting with a text-to-image UNet**: after every step the known region (mask 0) is set back to the original
  latents noised to the next step's level, so the model only ever fills the masked region in; the decoded image is
  then composited over the original in pixel space, so unmasked pixels are the input's exactly.
- **a dedicated inpainting UNet** (:attr:`~ldm.models.presets.Task.INPAINT`): the mask and the masked image's latents
  ride along as extra input channels; the pixel composite is the same.
- **latent upscaling** (:attr:`~ldm.models.presets.Task.UPSCALE`, the LDM paper's super-resolution): the
  low-resolution image's latents, upsampled to the output's latent size and noise-augmented to ``noise_level``, are
  extra input channels, and the level is the UNet's class label.

Random numbers come from the per-image generators in diffusers' order — the image's posterior sample, then the
initial noise, then the masked image's posterior sample — so that diffusers' img2img and inpainting pipelines are
exact oracles for the same weights, seeds and sampler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ldm.errors import LdmError
from ldm.images import unit_to_signed
from ldm.models.tasks import Task

DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength
DEFAULT_NOISE_LEVEL = 20  # an upscaler's noise augmentation at inference (diffusers' x4 upscaler default)


class Fill(enum.Enum):
    """What the masked region starts from when strength < 1 (A1111's "Masked content"); the value is its label."""

    ORIGINAL = "original"  # the image's own latents, noised
    LATENT_NOISE = "latent noise"  # fresh noise in the masked region
    LATENT_NOTHING = "latent nothing"  # zero latents in the masked region


def strength_steps(steps: int, strength: float) -> int:
    """The number of the ``steps`` that img2img at ``strength`` runs (diffusers' and A1111's rule): the last
    ⌊steps·strength⌋ of them."""
    return min(int(steps * strength), steps)


def check_inputs(task: Task, *, image, mask, low_res, strength: float, noise_level: int, noise_levels: int | None,
                 width: int, height: int, upscale_factor: int) -> None:  # fmt: skip
    """Reject image inputs the model cannot take, each with the fix."""
    if not 0.0 <= strength <= 1.0:
        raise LdmError(f"strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {strength}; 0.75 is usual")
    if mask is not None and image is None:
        raise LdmError("a mask needs the image it masks; pass --init-image FILE with --mask")
    if task is Task.UPSCALE:
        if low_res is None:
            raise LdmError("this model is an upscaler: it takes a low-resolution image, not a prompt alone; use it as "
                           "generate.py --upscale BUNDLE, or python -m ldm upscale IMAGE --model BUNDLE")  # fmt: skip
        if image is not None:
            raise LdmError("an upscaler takes no --init-image or --mask; pass the image to upscale")
        if not 0 <= noise_level < noise_levels:
            raise LdmError(f"noise level must be in [0, {noise_levels - 1}], got {noise_level}; 20 is usual")
        if low_res.shape[-2:] != (height // upscale_factor, width // upscale_factor):
            raise LdmError(f"the low-resolution image is {low_res.shape[-1]}×{low_res.shape[-2]}, the output "
                           f"{width}×{height} needs {width // upscale_factor}×{height // upscale_factor} "
                           f"(the upscaler's factor is {upscale_factor})")  # fmt: skip
        return
    if low_res is not None:
        raise LdmError(f"this model is a {task.value} model, not an upscaler; pass an upscaler bundle "
                       "(train_unet.py --task upscale) to upscale")  # fmt: skip
    if task is Task.INPAINT and mask is None:
        raise LdmError("this model is an inpainting model: it needs --init-image FILE and --mask FILE (white = repaint)")
    for name, pixels, channels in (("image", image, 3), ("mask", mask, 1)):
        if pixels is not None and (pixels.ndim != 4 or pixels.shape[1] != channels or pixels.shape[-2:] != (height, width)):
            raise ValueError(f"{name} must be (B, {channels}, {height}, {width}), got {tuple(pixels.shape)}")
    if mask is not None and not bool((mask >= 0.5).any()):
        raise LdmError("the mask has no white pixel, so there is nothing to repaint; white (≥ 50 % grey) marks the "
                       "region to repaint")  # fmt: skip


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask → (B, 1, H/f, W/f) binary latent mask: a latent cell is repainted when any of its
    pixels is at least half white, so that every masked pixel is regenerated (a nearest-neighbour downsample, as
    diffusers uses, can miss thin strokes; on masks aligned to the cells the two agree)."""
    return F.max_pool2d((mask >= 0.5).to(torch.float32), kernel_size=factor)


def encode_sample(vae, pixels: torch.Tensor, generators: list[torch.Generator], *, scaling: float) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, C, h, w) scaled posterior samples, image i drawn from ``generators[i]``."""
    signed = unit_to_signed(pixels).to(vae.device, vae.dtype)
    samples = [vae.encode(signed[i : i + 1]).latent_dist.sample(generator=g) for i, g in enumerate(generators)]
    return torch.cat(samples) * scaling


def encode_mean(vae, pixels: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, C, h, w) scaled posterior means (what an upscaler is trained on)."""
    return vae.encode(unit_to_signed(pixels).to(vae.device, vae.dtype)).latent_dist.mean * scaling


@dataclass
class ImageInputs:
    """What one run keeps of its image inputs, in latent space; all None for text-to-image."""

    noise: torch.Tensor  # (B, C, h, w) the initial noise
    image_latents: torch.Tensor | None = None  # (B, C, h, w) the image's scaled latents (re-imposed when reimpose)
    mask: torch.Tensor | None = None  # (B, 1, h, w) 1 = repaint
    extra: torch.Tensor | None = None  # (B, k, h, w) channels put after the UNet input's own
    class_labels: torch.Tensor | None = None  # (B,) an upscaler's noise level
    reimpose: bool = False  # a text-to-image UNet inpaints: the known region is set back after each step
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1] the image the output is composited over
    alpha: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1] the composite's weight of the generated pixels

    def model_input(self, scaled: torch.Tensor, *, guided: bool) -> torch.Tensor:
        """The UNet's input: the (scaled) noisy latents, then the task's extra channels."""
        if self.extra is None:
            return scaled
        extra = torch.cat([self.extra] * 2) if guided else self.extra
        return torch.cat([scaled, extra.to(scaled.dtype)], dim=1)

    def unet_kwargs(self, *, guided: bool) -> dict:
        if self.class_labels is None:
            return {}
        return {"class_labels": torch.cat([self.class_labels] * 2) if guided else self.class_labels}

    def after_step(self, latents: torch.Tensor, scheduler, next_timestep: torch.Tensor | None) -> torch.Tensor:
        """With a text-to-image UNet inpainting: the known region back to the original's latents at the next step's
        noise level (un-noised after the last step)."""
        if not self.reimpose:
            return latents
        known = self.image_latents
        if next_timestep is not None:
            known = scheduler.add_noise(known, self.noise, next_timestep.reshape(1))
        return (1 - self.mask) * known + self.mask * latents

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) decoded pixels in [0, 1], composited over the original where inpainting."""
        if self.alpha is None:
            return images
        alpha = self.alpha.to(images)
        return self.pixels.to(images) * (1 - alpha) + images * alpha


def start(bundle, request, scheduler, generators: list[torch.Generator], *, shape: tuple[int, ...], device,
          dtype) -> tuple[torch.Tensor, torch.Tensor, ImageInputs]:  # fmt: skip
    """The first latents (B, C, h, w), the timesteps to run and the run's :class:`ImageInputs`, for a scheduler
    whose timesteps are set."""
    config = bundle.config
    task, factor, scaling = config.task, config.vae.downsampling_factor, config.vae.scaling_factor
    image, mask, low_res = request.image, request.mask, request.low_res
    check_inputs(task, image=image, mask=mask, low_res=low_res, strength=request.strength,
                 noise_level=request.noise_level, noise_levels=config.unet.num_class_embeds, width=request.width,
                 height=request.height, upscale_factor=config.upscale_factor)  # fmt: skip
    strength = request.strength if image is not None else 1.0
    timesteps = scheduler.timesteps
    if strength < 1.0:
        begin = (request.steps - strength_steps(request.steps, strength)) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
    inpaint = mask is not None
    reimpose = inpaint and task is Task.TEXT_TO_IMAGE
    image_latents = None
    if image is not None and (strength < 1.0 or reimpose):
        image_latents = encode_sample(bundle.vae, image, generators, scaling=scaling).to(device, dtype)
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    m = latent_mask(mask, factor).to(device, dtype) if inpaint else None
    if strength >= 1.0:
        latents = noise * scheduler.init_noise_sigma
    elif len(timesteps) == 0:
        latents = image_latents  # strength 0 (or too few steps to run one): the image's own latents
    else:
        init = image_latents
        if inpaint and request.fill is Fill.LATENT_NOISE:
            init = torch.where(m > 0, randn_tensor(shape, generator=generators, device=device, dtype=dtype), init)
        elif inpaint and request.fill is Fill.LATENT_NOTHING:
            init = init * (1 - m)
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(shape[0]))
    inputs = ImageInputs(noise=noise, image_latents=image_latents, mask=m, reimpose=reimpose)
    if inpaint:
        inputs.pixels, inputs.alpha = image, mask
    if task is Task.INPAINT:
        masked = image * (mask < 0.5)  # the known pixels, the masked region mid-grey (0 in the VAE's range)
        masked = encode_sample(bundle.vae, masked + 0.5 * (mask >= 0.5), generators, scaling=scaling)
        inputs.extra = torch.cat([m, masked.to(device, dtype)], dim=1)
    if task is Task.UPSCALE:
        inputs.extra = augmented_low_res(bundle, low_res, request.noise_level, generators, shape=shape, device=device,
                                         dtype=dtype)  # fmt: skip
        inputs.class_labels = torch.full((shape[0],), request.noise_level, device=device, dtype=torch.long)
    return latents, timesteps, inputs


def augmented_low_res(bundle, low_res: torch.Tensor, level: int, generators: list[torch.Generator], *,
                      shape: tuple[int, ...], device, dtype) -> torch.Tensor:  # fmt: skip
    """The low-resolution image's latents noised to ``level`` by the model's own forward process, at their own size,
    then upsampled (nearest) to the output's latent size: the training side's noise augmentation
    (:func:`ldm.train.tasks.upscale_condition`), so the two see noise of one structure."""
    config = bundle.config
    latents = encode_mean(bundle.vae, low_res, scaling=config.vae.scaling_factor).float()
    noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=torch.float32)
    forward = DDPMScheduler.from_config(config.schedule.diffusers_config())
    noised = forward.add_noise(latents, noise, torch.full((shape[0],), level, dtype=torch.long))
    return F.interpolate(noised, scale_factor=config.upscale_factor, mode="nearest").to(device, dtype)
