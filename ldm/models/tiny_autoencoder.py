"""The tiny autoencoder: a TAESD-shaped encoder and decoder (Bohan 2023) distilled from a bundle's KL autoencoder.

It maps the same latents to nearly the same pixels as the full decoder at a fraction of the cost: no normalisation,
no attention, a few 3×3 residual blocks per level. The module is diffusers' ``AutoencoderTiny`` itself, so it
exports as one with no conversion.

**Latents.** The tiny autoencoder works on the latents the diffusion model sees — the full VAE's latents times its
scaling factor (the bundle's ``vae.scaling_factor``, never a constant) — which is the convention diffusers'
``AutoencoderTiny`` follows with its own ``scaling_factor`` of 1.0: a diffusers pipeline divides by 1.0 before
``decode`` and multiplies by 1.0 after ``encode``, so it hands the tiny autoencoder the same numbers we do::

    full:  pixels = vae.decode(latents / scaling_factor)      latents = vae.encode(pixels).mean · scaling_factor
    tiny:  pixels ≈ tiny.decode(latents)                       latents ≈ tiny.encode(pixels)

``latent_magnitude`` and ``latent_shift`` (3 and 0.5, diffusers' defaults) only map latents to [0, 1] for storing
them as 8-bit images (``AutoencoderTiny.scale_latents``); encode and decode do not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderTiny

MAX_BLOCKS = 64  # residual blocks per level: TAESD has 3
TRAIN_COMMAND = "python train_tiny_vae.py --bundle BUNDLE --data IMAGES --out runs/tiny-vae"  # how to make one


@dataclass(frozen=True, kw_only=True)
class TinyAutoencoderConfig:
    latent_channels: int = 4  # the full VAE's: the bundle's vae.latent_channels
    encoder_channels: int = 64  # every level of the encoder has this width (AutoencoderTiny's blocks need one)
    decoder_channels: int = 64
    # Residual blocks per level; L levels down- or upsample by 2^(L−1), which must be the full VAE's factor.
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # from the image's size down to the latents'
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # from the latents' size up to the image's

    def __post_init__(self):
        for name in ("latent_channels", "encoder_channels", "decoder_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(self, name)
            if not blocks:
                raise ValueError(f"{name} needs at least one level (L levels scale by 2^(L-1))")
            if min(blocks) < 0 or max(blocks) > MAX_BLOCKS:
                raise ValueError(f"{name} must each be from 0 to {MAX_BLOCKS} (TAESD has 3), got {list(blocks)}")
        if len(self.encoder_blocks) != len(self.decoder_blocks):
            raise ValueError(f"encoder_blocks and decoder_blocks must have as many levels (the same downsampling "
                             f"factor), got {len(self.encoder_blocks)} and {len(self.decoder_blocks)}")  # fmt: skip

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side: 2^(levels − 1)."""
        return 2 ** (len(self.decoder_blocks) - 1)

    def diffusers_kwargs(self) -> dict:
        levels = len(self.decoder_blocks)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "encoder_block_out_channels": (self.encoder_channels,) * levels,
            "decoder_block_out_channels": (self.decoder_channels,) * levels,
            "act_fn": "relu",
            "upsample_fn": "nearest",
            "latent_channels": self.latent_channels,
            "upsampling_scaling_factor": 2,
            "num_encoder_blocks": self.encoder_blocks,
            "num_decoder_blocks": self.decoder_blocks,
            "latent_magnitude": 3,
            "latent_shift": 0.5,
            "force_upcast": False,
            "scaling_factor": 1.0,  # it takes the diffusion model's latents as they are (module docstring)
            "shift_factor": 0.0,
        }

    @classmethod
    def from_diffusers(cls, config: dict) -> TinyAutoencoderConfig:
        """The config of an ``AutoencoderTiny`` (its ``config`` or ``config.json``); a :class:`ValueError` for the
        settings ours cannot express, so that nothing imports as another model."""
        encoder, decoder = tuple(config["encoder_block_out_channels"]), tuple(config["decoder_block_out_channels"])
        for what, widths in (("encoder", encoder), ("decoder", decoder)):
            if len(set(widths)) != 1:
                raise ValueError(f"an AutoencoderTiny {what} of several widths {list(widths)} is not supported")
        made = cls(
            latent_channels=config["latent_channels"], encoder_channels=encoder[0], decoder_channels=decoder[0],
            encoder_blocks=tuple(config["num_encoder_blocks"]), decoder_blocks=tuple(config["num_decoder_blocks"]),
        )  # fmt: skip
        expected = made.diffusers_kwargs()
        differ = [f"{key}={config[key]!r}" for key in sorted(expected) if key in config
                  and _plain(config[key]) != _plain(expected[key])]  # fmt: skip
        if differ:
            raise ValueError(f"AutoencoderTiny settings not supported: {', '.join(differ[:4])}")
        return made


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def build_tiny_autoencoder(config: TinyAutoencoderConfig) -> AutoencoderTiny:
    """A randomly initialised tiny autoencoder of the given shape."""
    return AutoencoderTiny(**config.diffusers_kwargs())


def tiny_config(tiny: AutoencoderTiny) -> TinyAutoencoderConfig:
    """The config a tiny autoencoder was built from."""
    return TinyAutoencoderConfig.from_diffusers(dict(tiny.config))


def tiny_decode(tiny: AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as the diffusion model sees them (the full VAE's × its scaling factor) → (B, 3, f·h, f·w)
    images, about [-1, 1] (the tiny decoder does not clamp)."""
    return tiny.decode(latents).sample


def tiny_encode(tiny: AutoencoderTiny, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] → (B, C, H/f, W/f) latents as the diffusion model sees them."""
    return tiny.encode(images).latents
