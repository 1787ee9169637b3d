"""The UNet on overlapping latent tiles (MultiDiffusion) as the sampling loop calls it."""

import pytest
import torch

from ldm.formats.bundle import create_bundle
from ldm.models.presets import PRESETS, Task
from ldm.pipeline.upscale import TiledUNet


@pytest.fixture(scope="module")
def upscaler():
    return create_bundle(PRESETS["micro"].for_task(Task.UPSCALE), seed=0).unet.eval()


@torch.no_grad()
def test_one_tile_is_the_unet_itself(upscaler):
    x, context, labels = torch.randn(2, 8, 16, 16), torch.randn(2, 77, 32), torch.tensor([3, 40])
    expected = upscaler(x, 10, encoder_hidden_states=context, class_labels=labels).sample
    got = TiledUNet(upscaler, tile=16, overlap=4)(x, 10, encoder_hidden_states=context, class_labels=labels).sample
    assert torch.equal(got, expected)


@torch.no_grad()
def test_large_inputs_are_blended_from_tiles_of_the_training_size(upscaler, monkeypatch):
    seen = []
    forward = upscaler.forward

    def spy(sample, *args, **kwargs):
        seen.append(tuple(sample.shape[-2:]))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(upscaler, "forward", spy)
    x, context = torch.randn(1, 8, 40, 24), torch.randn(1, 77, 32)
    out = TiledUNet(upscaler, tile=16, overlap=4)(x, 10, encoder_hidden_states=context, class_labels=torch.tensor([0]))
    assert out.sample.shape == (1, 4, 40, 24)
    assert set(seen) == {(16, 16)} and len(seen) == 3 * 2  # 40 → 3 tiles of 16, 24 → 2
    assert torch.isfinite(out.sample).all()
