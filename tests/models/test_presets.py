from dataclasses import replace

import pytest
import torch
from accelerate import init_empty_weights

from ldm.config import from_dict, to_dict
from ldm.models.autoencoder import build_autoencoder
from ldm.models.presets import PRESETS, ModelConfig, Task
from ldm.models.text_encoder import build_text_encoder
from ldm.models.unet import build_unet


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = PRESETS[name]
    big = name.startswith("sd-")
    with init_empty_weights(include_buffers=False) if big else torch.device("cpu"):
        vae, text, unet = build_autoencoder(cfg.vae), build_text_encoder(cfg.text_encoder), build_unet(cfg.unet)
    assert vae.config.scaling_factor == cfg.vae.scaling_factor
    assert unet.config.cross_attention_dim == text.model.config.hidden_size == cfg.text_encoder.width
    if not big:  # run them: a forward pass of each part at the preset's size
        side = cfg.default_size
        with torch.no_grad():
            latents = vae.encode(torch.zeros(1, 3, side, side)).latent_dist.mean  # (1, 4, side/8, side/8)
            assert latents.shape == (1, cfg.vae.latent_channels, side // 8, side // 8)
            hidden = text(torch.zeros(1, 77, dtype=torch.long)).hidden_states
            assert hidden.shape == (1, 77, cfg.text_encoder.width)
            out = unet(latents, torch.tensor(10), encoder_hidden_states=hidden).sample
            assert out.shape == latents.shape


def test_sd_presets_match_published_sizes():
    with init_empty_weights(include_buffers=False):
        unet_v1 = build_unet(PRESETS["sd-v1"].unet)
        text_v1 = build_text_encoder(PRESETS["sd-v1"].text_encoder)
        vae = build_autoencoder(PRESETS["sd-v1"].vae)
        unet_v2 = build_unet(PRESETS["sd-v2"].unet)
    assert _params(unet_v1) == 859_520_964  # the SD 1.x UNet
    assert _params(text_v1) == 123_060_480  # CLIP ViT-L/14 text tower
    assert _params(vae) == 83_653_863  # KL-f8
    assert _params(unet_v2) == 865_910_724  # the SD 2.x UNet
    assert PRESETS["sd-v1"].vae.scaling_factor == 0.18215
    assert PRESETS["sd-v2"].schedule.prediction.value == "v_prediction"
    assert PRESETS["sd-v2"].default_size == 768


@pytest.mark.parametrize("task, channels", [(Task.INPAINT, 2 * 4 + 1), (Task.UPSCALE, 2 * 4)])
def test_for_task_sets_the_unet_input_and_round_trips(task, channels):
    config = PRESETS["micro"].for_task(task, upscale_factor=2)
    assert config.unet.in_channels == channels and config.unet.out_channels == 4
    assert config.default_size == PRESETS["micro"].default_size * (2 if task is Task.UPSCALE else 1)
    assert from_dict(ModelConfig, to_dict(config)) == config
    unet = build_unet(config.unet)
    assert unet.conv_in.in_channels == channels
    assert (unet.class_embedding is not None) == (task is Task.UPSCALE)


def test_task_and_input_channels_must_agree():
    micro = PRESETS["micro"]
    with pytest.raises(ValueError, match="in_channels must be 9 for task inpaint"):
        replace(micro, task=Task.INPAINT)
    with pytest.raises(ValueError, match="upscale_factor must be 2 or more"):
        replace(micro.for_task(Task.UPSCALE), upscale_factor=1)
    with pytest.raises(ValueError, match="for task upscale only"):
        replace(micro, unet=replace(micro.unet, num_class_embeds=10))
