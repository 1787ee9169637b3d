"""ldm.images' pixel conversions and fits: exact values, rounding, the ranges' round trips, and the checks."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.images import (
    CropPlan,
    check_size,
    cover_size,
    crop_tensor,
    fit_square,
    fit_tensor,
    load_image,
    pil_to_uint8,
    plan_crop,
    save_png,
    signed_to_unit,
    square_resize,
    to_uint8,
    uint8_to_pil,
    uint8_to_signed,
    uint8_to_unit,
)

EVERY_BYTE = torch.arange(256, dtype=torch.uint8)


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_to_uint8_clamps_and_rounds_as_numpy_does():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2  # some out of range
    expected = np.round(np.clip(x.numpy(), 0, 1) * 255).astype(np.uint8)  # diffusers' numpy_to_pil rounding
    assert to_uint8(x).shape == x.shape and np.array_equal(to_uint8(x).numpy(), expected)
    ties = torch.tensor([0.5, 1.5, 2.5, 253.5]) / 255  # x·255 lands on (about) a half
    assert to_uint8(ties).tolist() == np.round(ties.numpy() * 255).astype(np.uint8).tolist()


def test_the_ranges_round_trip_every_byte():
    unit, signed = uint8_to_unit(EVERY_BYTE), uint8_to_signed(EVERY_BYTE)
    assert unit.dtype == signed.dtype == torch.float32
    assert unit[0] == 0 and unit[-1] == 1 and signed[0] == -1 and signed[-1] == 1
    assert torch.equal(to_uint8(unit), EVERY_BYTE)
    assert torch.equal(to_uint8(signed_to_unit(signed)), EVERY_BYTE)


def test_signed_to_unit_computes_in_the_input_dtype():
    """The sampling loop's images from a bf16 VAE keep their numbers: the map runs in bf16, then the cast."""
    x = torch.linspace(-1.2, 1.2, 101).to(torch.bfloat16)
    out = signed_to_unit(x)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, (x / 2 + 0.5).clamp(0, 1).float())
    channels_last = torch.zeros(1, 3, 4, 4).to(memory_format=torch.channels_last)
    assert signed_to_unit(channels_last).is_contiguous()


def test_pil_and_uint8_tensors_convert_both_ways():
    image = _picture(7, 5)
    pixels = pil_to_uint8(image)
    assert pixels.shape == (3, 5, 7) and pixels.dtype == torch.uint8
    assert np.array_equal(np.asarray(uint8_to_pil(pixels)), np.asarray(image))
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(image))


@pytest.mark.parametrize(
    "size, target, expected",
    [((64, 64), (64, 64), (64, 64)), ((100, 50), (64, 64), (128, 64)), ((1000, 50), (32, 128), (2560, 128)),
     ((300, 200), (96, 32), (96, 64)), ((333, 500), (256, 256), (256, 384))],
)  # fmt: skip
def test_cover_size_just_covers_the_target(size, target, expected):
    assert cover_size(size, target) == expected


def test_fit_square_and_the_centre_crop_plan_agree():
    for width, height in [(80, 48), (48, 80), (32, 32), (20, 30)]:
        image = _picture(width, height, seed=width)
        plan = plan_crop(image.size, (32, 32), center_crop=True, flip_p=0.0, generator=torch.Generator())
        assert torch.equal(uint8_to_signed(pil_to_uint8(fit_square(image, 32))), crop_tensor(image, plan))
        assert torch.equal(fit_tensor(image, (32, 32)), crop_tensor(image, plan))


def test_a_crop_plan_draws_three_numbers_whatever_the_settings():
    for center_crop, flip_p in [(True, 0.0), (False, 1.0)]:
        used, fresh = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        plan_crop((90, 40), (32, 32), center_crop=center_crop, flip_p=flip_p, generator=used)
        for _ in range(3):
            torch.rand((), generator=fresh)
        assert torch.equal(used.get_state(), fresh.get_state())
    flipped = plan_crop((32, 32), (32, 32), center_crop=True, flip_p=1.0, generator=torch.Generator())
    assert flipped == CropPlan(resized=(32, 32), box=(0, 0, 32, 32), flip=True)
    image = _picture(32, 32)
    assert torch.equal(crop_tensor(image, flipped), crop_tensor(image, replace(flipped, flip=False)).flip(-1))


def test_square_resize_crops_the_centre_then_resizes():
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(square_resize(x, 6), x[..., 2:8])
    assert square_resize(x, 3).shape == (2, 3, 3, 3)


def test_sizes_follow_the_vae_factor(tmp_path):
    check_size(36, factor=4)
    with pytest.raises(LdmError, match=r"--size must be a positive multiple of 8 .* got 36; try 32"):
        check_size(36, factor=8)
    _picture(36, 44).save(tmp_path / "a.png")
    pixels, original = load_image(tmp_path / "a.png", factor=4)
    assert pixels.shape == (3, 44, 36) and original == (36, 44) and pixels.min() >= -1 and pixels.max() <= 1
    with pytest.raises(LdmError, match="not a multiple of 8 on each side; .* crop to 32×40"):
        load_image(tmp_path / "a.png", factor=8)
    assert load_image(tmp_path / "a.png", factor=8, size=32)[0].shape == (3, 32, 32)


def test_save_png_writes_rounded_clamped_bytes(tmp_path):
    image = torch.tensor([0.0, 0.2, 1.0, 1.5, -0.5]).view(1, 1, 5).expand(3, 1, 5)
    save_png(tmp_path / "x.png", image)
    assert np.asarray(Image.open(tmp_path / "x.png"))[0, :, 0].tolist() == [0, 51, 255, 255, 0]
