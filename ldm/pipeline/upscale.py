"""Latent upscaling of finished images with an upscaler bundle (:attr:`~ldm.models.presets.Task.UPSCALE`).

The images are the low-resolution input of :mod:`ldm.pipeline.modes`; the output is ``upscale_factor`` times their
size. An output larger than the upscaler's training size is denoised in overlapping tiles of that size at every
step (:class:`TiledUNet`), so any size runs in the memory of one tile and at the scale the model
learned.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ldm.errors import LdmError
from ldm.models.tasks import Task
from ldm.models.tiling import run_tiled
from ldm.pipeline.denoiser import UNetWrapper
from ldm.pipeline.schedule import Sampler
from ldm.pipeline.text_to_image import Request, generate

TILE_OVERLAP = 4  # parts of a tile's side that neighbouring tiles share: a quarter


@torch.no_grad()
def upscale(bundle, images: torch.Tensor, *, prompts: list[str], negative_prompts: list[str], seeds: list[int],
            steps: int, guidance_scale: float, sampler: Sampler, noise_level: int, progress: bool = False,
            embeddings=None) -> torch.Tensor:  # fmt: skip
    """(B, 3, h, w) in [0, 1] → (B, 3, s·h, s·w) in [0, 1], s the upscaler's factor; h and w multiples of the VAE's
    downsampling factor. ``embeddings``: the textual-inversion embeddings the prompts may name."""
    config = bundle.config
    if config.task is not Task.UPSCALE:
        raise LdmError(f"{bundle.name} is a {config.task.value} model, not an upscaler; pass a bundle made by "
                       "train_unet.py --task upscale")  # fmt: skip
    s, factor = config.upscale_factor, config.vae.downsampling_factor
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise LdmError(f"the image to upscale is {w}×{h}; its sides must be multiples of {factor}")
    tile = config.unet.sample_size  # latent cells of the output the upscaler was trained at
    cells = max(h, w) * s // factor
    unet = bundle.unet
    if cells > tile:
        unet = TiledUNet(unet, tile=tile, overlap=max(1, tile // TILE_OVERLAP))
    request = Request(
        prompts=prompts, negative_prompts=negative_prompts, seeds=seeds, steps=steps, guidance_scale=guidance_scale,
        sampler=sampler, width=w * s, height=h * s, low_res=images, noise_level=noise_level, embeddings=embeddings,
    )  # fmt: skip
    return generate(replace(bundle, unet=unet), request, progress=progress)


# --- the tiled denoiser -------------------------------------------------------------------------------------------------


class TiledUNet(UNetWrapper):
    """A UNet run on overlapping latent tiles at every call, its predictions blended as the VAE's tiles are
    (MultiDiffusion, Bar-Tal et al. 2023): every step sees the whole latent, each UNet call only a tile of the size
    it was trained at, so memory stays flat and the content stays at the training scale. Same call as the UNet; the
    extra input channels and the class labels of an upscaler go with each tile."""

    def __init__(self, unet: torch.nn.Module, *, tile: int, overlap: int):
        super().__init__(unet)
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"tile {tile} and overlap {overlap} (latent cells) need 0 ≤ overlap < tile")
        self.tile, self.overlap = tile, overlap

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        def one(tile: torch.Tensor) -> torch.Tensor:
            return self.unet(tile, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample

        out = run_tiled(one, sample, tile=self.tile, overlap=self.overlap, in_scale=1, out_scale=1)
        return UNet2DConditionOutput(sample=out.to(sample.dtype))
