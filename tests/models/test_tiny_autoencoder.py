"""The tiny autoencoder: its config maps onto diffusers' AutoencoderTiny, shapes round-trip, latents are the
diffusion model's (the VAE's × its scaling factor), and configs that do not fit are refused by name."""

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderTiny

from ldm.config import from_dict, to_dict
from ldm.models.presets import TINY_AUTOENCODER_PRESETS, get_tiny_preset
from ldm.models.tiny_autoencoder import (
    TinyAutoencoderConfig,
    build_tiny_autoencoder,
    tiny_config,
    tiny_decode,
    tiny_encode,
)


@pytest.mark.parametrize("name", sorted(TINY_AUTOENCODER_PRESETS))
def test_presets_build_and_round_trip_shapes(name):
    config = get_tiny_preset(name, latent_channels=16)
    assert config.latent_channels == 16 and config.downsampling_factor == 8
    torch.manual_seed(0)
    tiny = build_tiny_autoencoder(config).eval()
    assert isinstance(tiny, AutoencoderTiny)
    assert tiny_config(tiny) == config and from_dict(TinyAutoencoderConfig, to_dict(config)) == config
    with torch.no_grad():
        latents = tiny_encode(tiny, torch.rand(2, 3, 32, 16) * 2 - 1)
        assert latents.shape == (2, 16, 4, 2)
        assert tiny_decode(tiny, latents).shape == (2, 3, 32, 16)


def test_the_config_is_diffusers_own():
    """AutoencoderTiny's defaults are TAESD's shape: the taesd preset builds the same module."""
    ours = build_tiny_autoencoder(get_tiny_preset("taesd", latent_channels=4))
    theirs = AutoencoderTiny()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}

    def settings(tiny):
        return {k: v for k, v in tiny.config.items() if not k.startswith("_")}

    assert settings(ours) == settings(theirs)
    assert ours.config.scaling_factor == 1.0  # it takes the diffusion model's latents as they are


def test_latents_are_the_diffusion_models():
    """decode applies the decoder to the latents as given (no division by a scaling factor) and encode returns the
    encoder's output as it is: a diffusers pipeline, which divides by the tiny VAE's scaling factor of 1.0, hands it
    the same numbers our pipeline does."""
    torch.manual_seed(0)
    tiny = build_tiny_autoencoder(get_tiny_preset("micro", latent_channels=4)).eval()
    latents, pixels = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiny_decode(tiny, latents), tiny.decoder(latents))
        assert torch.equal(tiny_encode(tiny, pixels), tiny.encoder(pixels))
        assert torch.equal(tiny_decode(tiny, latents), tiny.decode(latents / tiny.config.scaling_factor).sample)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_blocks": (1, 1, 1)}, "as many levels"),
        ({"decoder_blocks": ()}, "at least one level"),
        ({"decoder_blocks": (1, 1, 65, 1)}, "from 0 to 64"),
        ({"encoder_channels": 0}, "encoder_channels must be at least 1"),
    ],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TinyAutoencoderConfig(), **change)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"act_fn": "silu"}, "act_fn='silu'"),
        ({"scaling_factor": 0.5}, "scaling_factor=0.5"),
        ({"decoder_block_out_channels": (64, 64, 32, 32)}, "several widths"),
    ],
)
def test_autoencoder_tiny_settings_ours_cannot_express_are_refused(change, message):
    config = dict(AutoencoderTiny().config) | change
    with pytest.raises(ValueError, match=message):
        TinyAutoencoderConfig.from_diffusers(config)
