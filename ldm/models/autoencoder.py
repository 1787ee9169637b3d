"""The KL-regularised autoencoder (Rombach et al. 2022, §3): diffusers' ``AutoencoderKL``.

The encoder maps (B, 3, H, W) pixels in [-1, 1] to a diagonal Gaussian over (B, C, H/f, W/f) latents, f = 2^(levels-1);
diffusion runs on ``latent * scaling_factor`` so that latents have about unit variance.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    # 1 / std of the latents over the training data; diffusion sees latent * scaling_factor.
    # 1.0 means "not measured yet": train_vae.py measures it, presets carry the published values.
    scaling_factor: float = 1.0

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level (L levels downsample by 2^(L-1))")
        if self.layers_per_block > 64:
            raise ValueError(f"layers_per_block must be at most 64 (SD's VAE has 2), got {self.layers_per_block}")
        for name in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.block_out_channels) < 1:
            raise ValueError("block_out_channels must be positive")
        if not math.isfinite(self.scaling_factor) or self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be a positive number, got {self.scaling_factor}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side: 2^(levels − 1), 8 for the usual four levels."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict:
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
        }

    @classmethod
    def from_diffusers(cls, config: dict) -> AutoencoderConfig:
        expect = {"act_fn": "silu", "force_upcast": config.get("force_upcast", True)}
        for key, value in expect.items():
            if config.get(key, value) != value:
                raise ValueError(f"unsupported AutoencoderKL setting {key}={config[key]!r}")
        if config.get("in_channels", 3) != config.get("out_channels", 3):
            raise ValueError("AutoencoderKL with in_channels != out_channels is not supported")
        return cls(
            in_channels=config.get("in_channels", 3),
            latent_channels=config["latent_channels"],
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            norm_num_groups=config.get("norm_num_groups", 32),
            sample_size=config.get("sample_size", 512),
            scaling_factor=config["scaling_factor"],
        )


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    """A randomly initialised autoencoder of the given shape."""
    return AutoencoderKL(**config.diffusers_kwargs())


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell of a diffusers VAE, read from its config as :attr:`AutoencoderConfig.downsampling_factor`
    is (each level but the last halves the grid)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, *, scaling_factor: float) -> torch.Tensor:
    """(B, C, h, w) scaled latents → (B, 3, f·h, f·w) images in [-1, 1], f the VAE's downsampling factor.

    A half-precision decode that overflows (NaN or inf, the "black image" failure) is redone in fp32, with a warning.
    """
    images = vae.decode(latents / scaling_factor).sample
    # images.dtype first: diffusers' vae.dtype walks every submodule (0.6 ms on emoji-tiny's VAE)
    if images.dtype != torch.float32 and vae.dtype != torch.float32 and not torch.isfinite(images).all():
        warnings.warn(f"the VAE decode overflowed in {vae.dtype}; decoding again in fp32", stacklevel=2)
        dtype = vae.dtype
        vae.to(torch.float32)
        try:
            images = vae.decode(latents.float() / scaling_factor).sample
        finally:
            vae.to(dtype)
    return images
