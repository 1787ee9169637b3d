"""What a UNet is trained to do (:class:`Task`), and the input channels that follow from it.

Apart from the model config so that the sampling loop's modes read it without importing the presets.
"""

from __future__ import annotations

import enum


class Task(enum.Enum):
    """What the UNet is trained to do, which fixes what its input holds beside the C noisy latent channels."""

    TEXT_TO_IMAGE = "text_to_image"  # the noisy latents only: C channels
    # + the mask downsampled to the latent size (1) + the masked image's latents (C): 2·C + 1, SD's inpainting layout
    INPAINT = "inpaint"
    # + the low-resolution image's latents, upsampled to the latent size (C): 2·C; its noise-augmentation level is
    # the UNet's class label (unet.num_class_embeds levels), as in SD's upscalers
    UPSCALE = "upscale"


def task_input_channels(task: Task, latent_channels: int) -> int:
    """The UNet's input channels for ``task`` with a VAE of ``latent_channels``."""
    c = latent_channels
    return {Task.TEXT_TO_IMAGE: c, Task.INPAINT: 2 * c + 1, Task.UPSCALE: 2 * c}[task]
