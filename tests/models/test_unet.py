"""widen_for_task: an inpainting or upscaling UNet made from a text-to-image one predicts as it does at step 0."""

from dataclasses import replace

import pytest
import torch

from ldm.models.presets import PRESETS, Task
from ldm.models.unet import build_unet, widen_for_task

MICRO = PRESETS["micro"]


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return build_unet(MICRO.unet).eval()


@pytest.mark.parametrize("task", [Task.INPAINT, Task.UPSCALE])
def test_widened_unet_predicts_as_the_base_whatever_the_extra_inputs(base_unet, task):
    config = MICRO.for_task(task, upscale_factor=2, noise_levels=1000).unet
    before = {k: v.clone() for k, v in base_unet.state_dict().items()}
    widened = widen_for_task(base_unet, config)
    assert widened.conv_in.in_channels == config.in_channels and not widened.training
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 8, 8, generator=generator)  # (B, C, h, w)
    extra = torch.randn(3, config.in_channels - 4, 8, 8, generator=generator) * 10  # any input at all
    t, context = torch.tensor([0, 500, 999]), torch.randn(3, 77, 32, generator=generator)
    labels = torch.tensor([0, 17, 999]) if task is Task.UPSCALE else None
    with torch.no_grad():
        expected = base_unet(x_t, t, encoder_hidden_states=context).sample
        got = widened(torch.cat([x_t, extra], dim=1), t, encoder_hidden_states=context, class_labels=labels).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(v, base_unet.state_dict()[k]) for k, v in before.items())  # the base is left as it was

    widened.train()  # and the new inputs do learn: the zero weights get gradients
    widened(torch.cat([x_t, extra], dim=1), t, encoder_hidden_states=context, class_labels=labels).sample.sum().backward()
    assert widened.conv_in.weight.grad[:, 4:].abs().sum() > 0
    if task is Task.UPSCALE:
        assert widened.class_embedding.weight.grad.abs().sum() > 0


def test_widen_for_task_changes_the_input_only(base_unet):
    with pytest.raises(ValueError, match="input channels, class embedding and sample size only"):
        widen_for_task(base_unet, replace(MICRO.unet, in_channels=9, layers_per_block=2))
    inpaint = widen_for_task(base_unet, MICRO.for_task(Task.INPAINT).unet)
    with pytest.raises(ValueError, match="the UNet has 9, more than 4"):
        widen_for_task(inpaint, MICRO.unet)
