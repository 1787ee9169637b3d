"""ldm.models.autoencoder: the downsampling factor, decoding scaled latents, and the fp32 retry of a half-precision
decode that overflows."""

import math
import warnings

import pytest
import torch

from ldm.models.autoencoder import AutoencoderConfig, build_autoencoder, decode_latents, downsampling_factor
from ldm.models.presets import PRESETS


def micro_vae(dtype=torch.float32):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_autoencoder(PRESETS["micro"].vae).eval().to(dtype)


def overflow(module, inputs, output):
    return output * math.inf if output.dtype == torch.bfloat16 else output


@torch.no_grad()
def test_decode_divides_by_the_scaling_factor():
    vae, z = micro_vae(), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32: no retry, no warning
        images = decode_latents(vae, z, scaling_factor=0.5)
    torch.testing.assert_close(images, vae.decode(z / 0.5).sample)
    assert images.shape == (2, 3, 32, 32)


@torch.no_grad()
def test_half_precision_overflow_is_decoded_again_in_fp32():
    half = micro_vae(torch.bfloat16)
    rounded = micro_vae(torch.bfloat16).float()  # the weights the fp32 retry computes with
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    hook = half.decoder.conv_out.register_forward_hook(overflow)
    try:
        with pytest.warns(UserWarning, match="the VAE decode overflowed in torch.bfloat16; decoding again in fp32"):
            images = decode_latents(half, z, scaling_factor=1.0)
    finally:
        hook.remove()
    assert torch.isfinite(images).all()
    assert half.dtype == torch.bfloat16  # put back after the retry
    torch.testing.assert_close(images, decode_latents(rounded, z.float(), scaling_factor=1.0))


@torch.no_grad()
def test_the_downsampling_factor_is_two_to_the_levels_but_one():
    for channels, factor in [((8,), 1), ((8, 16, 16), 4), ((8, 8, 16, 16), 8)]:
        config = AutoencoderConfig(block_out_channels=channels, layers_per_block=1, norm_num_groups=4)
        vae = build_autoencoder(config).eval()
        assert config.downsampling_factor == downsampling_factor(vae) == factor
        z = vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
        assert z.shape[-2:] == (16 // factor, 16 // factor)
        assert decode_latents(vae, z, scaling_factor=1.0).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="at least one level"):
        AutoencoderConfig(block_out_channels=())
