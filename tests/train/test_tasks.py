"""The extra inputs of inpainting and upscaling training: the masks, the input layouts and the grids' Request."""


import pytest
import torch
import torch.nn.functional as F

from ldm.models.presets import Task
from ldm.pipeline.schedule import ScheduleConfig, get_sampler
from ldm.train.objectives import add_noise, alphas_cumprod
from ldm.train.tasks import (
    Condition,
    TaskInputConfig,
    downsample,
    inpaint_condition,
    make_condition,
    masked_image,
    random_masks,
    unet_input,
    upscale_condition,
)
from ldm.train.unet import TaskExamples, task_request

SHAPES_ONLY = TaskInputConfig(rectangle_masks=0.5, stroke_masks=0.5, full_masks=0.0)


def masks(config, n=64, *, size=(32, 48), seed=0):
    return random_masks(n, height=size[0], width=size[1], config=config, generator=torch.Generator().manual_seed(seed))


def test_masks_are_binary_of_the_shape_asked_and_repeat_for_a_seed():
    drawn = masks(TaskInputConfig())
    assert drawn.shape == (64, 1, 32, 48) and drawn.dtype == torch.float32
    assert set(drawn.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(drawn, masks(TaskInputConfig()))
    assert not torch.equal(drawn, masks(TaskInputConfig(), seed=1))


def test_mask_rates():
    full = masks(TaskInputConfig(rectangle_masks=0, stroke_masks=0, full_masks=1))
    assert bool((full == 1).all())
    covered = masks(SHAPES_ONLY, n=200).mean(dim=(1, 2, 3))  # (N,) the share of each image to repaint
    assert bool((covered > 0).all()) and bool((covered < 1).all())  # rectangles and strokes: never all, never none
    assert not masks(TaskInputConfig(rectangle_masks=0, stroke_masks=0, full_masks=0)).any()  # the rest: unmasked
    mixed = masks(TaskInputConfig(), n=400).mean(dim=(1, 2, 3))
    assert 60 < int((mixed == 1).sum()) < 140  # 25 % full masks by default
    rectangles = masks(TaskInputConfig(rectangle_masks=1, stroke_masks=0, full_masks=0), n=8)
    strokes = masks(TaskInputConfig(rectangle_masks=0, stroke_masks=1, full_masks=0), n=8)
    assert not torch.equal(rectangles, strokes)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"full_masks": 1.5}, r"task_inputs.full_masks must be a share in \[0, 1\]"),
        ({"full_masks": 0.5, "stroke_masks": 0.5}, "mask shares sum to 1.375, more than 1"),
        ({"max_noise_level": 0}, "max_noise_level must be at least 1"),
    ],
)
def test_bad_task_inputs(settings, message):
    with pytest.raises(ValueError, match=message):
        TaskInputConfig(**settings)


def test_inpaint_input_layout():
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = masks(SHAPES_ONLY, n=2, size=(16, 16))
    kept = masked_image(pixels, mask)
    assert torch.equal(kept[mask.expand_as(pixels) == 1], torch.zeros(int(mask.sum()) * 3))  # grey where repainted
    assert torch.equal(kept[mask.expand_as(pixels) == 0], pixels[mask.expand_as(pixels) == 0])
    latents = torch.randn(2, 4, 2, 2)
    channels = inpaint_condition(mask, latents)  # (2, 1 + 4, 2, 2)
    assert channels.shape == (2, 5, 2, 2)
    cells = torch.nn.functional.max_pool2d(mask, 8)  # a cell is masked when any of its pixels is, as in sampling
    assert torch.equal(channels[:, :1], cells)
    assert torch.equal(channels[:, 1:], latents)
    x_t = torch.randn(2, 4, 2, 2)
    assert torch.equal(unet_input(x_t, Condition(channels=channels)), torch.cat([x_t, cells, latents], 1))
    assert unet_input(x_t, Condition()) is x_t


def test_upscale_input_layout():
    """The low-res latents are noised at their own size, then enlarged: each 2×2 cell holds one noised latent."""
    ac = alphas_cumprod(ScheduleConfig())
    low, noise, levels = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0, 349])
    channels = upscale_condition(low, factor=2, levels=levels, noise=noise, alphas_cumprod=ac)
    assert channels.shape == (2, 4, 6, 6)
    expected = add_noise(low, noise, levels, ac).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(channels, expected)
    assert (channels[0] - low[0].repeat_interleave(2, -1).repeat_interleave(2, -2)).abs().max() < 0.15  # level 0
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    assert downsample(pixels, 4).shape == (1, 3, 4, 4) and downsample(pixels, 4).abs().max() <= 1
    torch.testing.assert_close(downsample(torch.full((1, 3, 16, 16), 0.25), 2), torch.full((1, 3, 8, 8), 0.25))


def fake_encode(pixels):  # signed pixels → (B, 4, H/8, W/8) "latents"
    return F.avg_pool2d(torch.cat([pixels, pixels[:, :1]], dim=1), 8)


@pytest.mark.parametrize("task, channels", [(Task.INPAINT, 5), (Task.UPSCALE, 4), (Task.TEXT_TO_IMAGE, None)])
def test_make_condition_draws_from_its_generator(task, channels):
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    ac = alphas_cumprod(ScheduleConfig())

    def condition(seed):
        return make_condition(task, pixels, encode=fake_encode, config=TaskInputConfig(), upscale_factor=2,
                              alphas_cumprod=ac, generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b = condition(0), condition(0)
    if channels is None:
        assert a.channels is None and a.class_labels is None
        return
    assert a.channels.shape == (3, channels, 4, 4) and torch.equal(a.channels, b.channels)
    assert not torch.equal(a.channels, condition(1).channels)
    if task is Task.UPSCALE:
        assert a.class_labels.dtype == torch.int64 and bool((a.class_labels < 350).all())
    else:
        assert a.class_labels is None


def test_task_request_fills_the_planned_fields_once_request_has_them():
    settings = dict(prompts=["a", "b"], negative_prompts=["", ""], seeds=[0, 1], steps=2, guidance_scale=1.0,
                    sampler=get_sampler("ddim"), width=64, height=64)  # fmt: skip
    examples = TaskExamples(images=torch.rand(2, 3, 64, 64), shown=torch.rand(2, 3, 64, 64),
                            mask=torch.ones(2, 1, 64, 64), low_res=torch.rand(2, 3, 32, 32))  # fmt: skip
    inpaint = task_request(Task.INPAINT, settings, examples, noise_level=30)
    assert inpaint.image is examples.images and inpaint.mask is examples.mask and inpaint.low_res is None
    assert inpaint.strength == 1.0 and inpaint.prompts == ["a", "b"]
    upscale = task_request(Task.UPSCALE, settings, examples, noise_level=30)
    assert upscale.low_res is examples.low_res and upscale.noise_level == 30 and upscale.image is None

