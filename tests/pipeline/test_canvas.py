"""The pixel side of img2img and inpainting: resize modes, the mask's blur, outpainting and only-masked crops."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.pipeline.canvas import ResizeMode, crop_region, fit, mask_from_image, outpaint, prepare


def picture(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8))


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_fit_gives_the_size_in_every_mode(mode):
    assert fit(picture(100, 50), 64, 64, mode).size == (64, 64)
    same = picture(64, 64)
    assert fit(same, 64, 64, mode) is same


def test_crop_keeps_the_centre_and_fill_repeats_the_edges():
    wide = picture(128, 64)
    cropped = np.asarray(fit(wide, 64, 64, ResizeMode.CROP))
    assert np.array_equal(cropped, np.asarray(wide)[:, 32:96])  # no scaling needed: the centre square
    filled = np.asarray(fit(wide, 64, 64, ResizeMode.FILL))  # scaled to 64×32, rows above and below repeat the edge
    assert np.array_equal(filled[0], filled[15]) and np.array_equal(filled[-1], filled[-16])
    assert ResizeMode.from_label("Crop and resize") is ResizeMode.CROP and ResizeMode.CROP.label == "Crop and resize"


def test_a_transparent_mask_keeps_and_an_opaque_white_repaints():
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 4, 8))
    mask = np.asarray(mask_from_image(rgba))
    assert mask[:, :4].min() == 255 and mask[:, 4:].max() == 0


def test_outpaint_grows_the_canvas_with_edge_pixels_and_masks_the_margins():
    image = picture(20, 10)
    canvas, mask = outpaint(image, None, (3, 2, 5, 1))
    assert canvas.size == mask.size == (28, 13)
    a, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(a[2:12, 3:23], np.asarray(image))
    assert np.array_equal(a[0, 3:23], np.asarray(image)[0]) and np.array_equal(a[5, 0], np.asarray(image)[3, 0])
    assert m[2:12, 3:23].max() == 0 and m[:2].min() == 255 and m[:, 23:].min() == 255


def test_crop_region_pads_and_takes_the_generation_aspect():
    mask = np.zeros((100, 200), bool)
    mask[40:50, 90:100] = True
    assert crop_region(mask, 5, 64, 64) == (85, 35, 105, 55)  # 10 + 2·5 square
    left, top, right, bottom = crop_region(mask, 5, 128, 64)  # twice as wide as high
    assert (right - left, bottom - top) == (40, 20) and left <= 85 and right >= 105
    mask[:] = False
    mask[0:4, 0:4] = True  # at the corner: the box stays inside the picture
    assert crop_region(mask, 8, 64, 64) == (0, 0, 12, 12)


def test_only_masked_pastes_back_into_the_whole_picture():
    image, mask = picture(96, 80), Image.new("L", (96, 80), 0)
    mask.paste(255, (40, 30, 56, 46))
    canvas = prepare(image, mask, width=64, height=64, mask_blur=0, only_masked=True, padding=8)
    assert canvas.image.shape == (1, 3, 64, 64) and canvas.mask.shape == (1, 1, 64, 64)
    assert canvas.box == (32, 22, 64, 54)
    white = torch.ones(2, 3, 64, 64)
    out = canvas.paste(white)
    assert out.shape == (2, 3, 80, 96)
    assert torch.equal(out[:, :, 30:46, 40:56], torch.ones(2, 3, 16, 16))
    keep = torch.ones(80, 96, dtype=torch.bool)
    keep[30:46, 40:56] = False
    assert torch.equal(out[0][:, keep], canvas.picture[0][:, keep])


def test_inpainting_the_whole_picture_comes_back_at_its_own_size():
    image, mask = picture(70, 60), Image.new("L", (70, 60), 0)
    mask.paste(255, (10, 10, 30, 30))
    canvas = prepare(image, mask, width=72, height=64, mask_blur=3)
    assert canvas.image.shape == (1, 3, 64, 72)
    out = canvas.paste(torch.zeros(1, 3, 64, 72))
    assert out.shape == (1, 3, 60, 70)
    zero = canvas.picture_mask[0, 0] == 0
    assert torch.equal(out[0][:, zero], canvas.picture[0][:, zero])
    assert 0 < canvas.picture_mask.min() + 1 and ((canvas.picture_mask > 0) & (canvas.picture_mask < 1)).any()


def test_a_mask_of_another_size_warns_and_a_black_one_is_refused():
    image = picture(64, 64)
    with pytest.warns(UserWarning, match="the mask is 32×32, the image 64×64"):
        prepare(image, Image.new("L", (32, 32), 255), width=64, height=64)
    with pytest.raises(LdmError, match="no white pixel"):
        prepare(image, Image.new("L", (64, 64), 100), width=64, height=64)
    with pytest.raises(LdmError, match="--only-masked needs a mask"):
        prepare(image, None, width=64, height=64, only_masked=True)
