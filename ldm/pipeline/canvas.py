"""The pixel side of img2img and inpainting: fitting the input image to the generation size, the mask's blur, the
outpainting canvas, and "only masked" inpainting at full resolution, whose outputs are pasted back.

:func:`prepare` turns the user's picture (and mask) into a :class:`Canvas`: the tensors the sampling loop takes
(:class:`ldm.pipeline.Request`'s ``image`` and ``mask``) and what :meth:`Canvas.paste` needs to put each output back
into the picture. The rules follow A1111's img2img tab, whose PNG keys the CLI writes:

- **resize** (``Resize mode``): *stretch* to the size ("Just resize"), *crop* — scale to cover, centre crop
  ("Crop and resize") — or *fill* — scale to fit, the rest filled with the stretched edge pixels ("Resize and fill").
- **mask** (white = repaint; alpha composited on black, so transparent means keep): resized to the image with a
  warning when its size differs; blurred by ``mask_blur`` pixels (a Gaussian of that radius), which softens the final
  composite only: a pixel the blurred mask leaves at 0 is the input's exactly. An inpainted output is always the
  picture at its own size: the picture is scaled to the generation size (which the CLI picks close to it) and the
  output scaled back and composited into the picture through the mask, so the resize modes are img2img's alone.
- **outpaint** (left, top, right, bottom pixels): the canvas grows by those margins, filled with the nearest edge
  pixels, and the margins join the mask.
- **only masked** (``Inpaint area: Only masked``): the mask's bounding box, widened by ``padding`` pixels and then to
  the generation size's aspect ratio, is cut out, generated at the full generation size, scaled back and pasted in.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ldm.errors import LdmError
from ldm.images import pil_to_uint8, uint8_to_unit

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom exclusive


class ResizeMode(enum.Enum):
    """How the input image meets the generation size; the value is the command-line name."""

    STRETCH = "stretch"
    CROP = "crop"
    FILL = "fill"

    @property
    def label(self) -> str:
        """A1111's name, written into PNG metadata."""
        return {"stretch": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill"}[self.value]

    @classmethod
    def from_label(cls, text: str) -> ResizeMode:
        for mode in cls:
            if text in (mode.value, mode.label):
                return mode
        raise ValueError(f"'Resize mode: {text}'")


def fit(image: Image.Image, width: int, height: int, mode: ResizeMode, *,
        resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:  # fmt: skip
    """``image`` at ``width``×``height`` as ``mode`` says."""
    if image.size == (width, height):
        return image
    if mode is ResizeMode.STRETCH:
        return image.resize((width, height), resample)
    if mode is ResizeMode.CROP:
        return ImageOps.fit(image, (width, height), resample)
    scale = min(width / image.width, height / image.height)
    inner = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    return _pad_edges(inner, width, height, ((width - inner.width) // 2, (height - inner.height) // 2))


def _pad_edges(image: Image.Image, width: int, height: int, offset: tuple[int, int]) -> Image.Image:
    """``image`` placed at ``offset`` on a ``width``×``height`` canvas whose rest repeats the nearest edge pixels."""
    left, top = offset
    pixels = np.asarray(image)
    pad = ((top, height - top - image.height), (left, width - left - image.width)) + ((0, 0),) * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


def mask_from_image(mask: Image.Image) -> Image.Image:
    """A mask file as one 8-bit channel, white = repaint; transparency is composited on black (keep)."""
    if mask.has_transparency_data:
        rgba = mask.convert("RGBA")
        mask = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return mask.convert("L")


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> Box:
    """The box around the mask's non-zero pixels, ``padding`` wider on each side, then widened (within the picture
    where it can be) to the aspect ratio of ``width``×``height``, so the crop is scaled, not distorted."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    h, w = mask.shape
    left, top = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    right, bottom = min(int(cols[-1]) + 1 + padding, w), min(int(rows[-1]) + 1 + padding, h)
    box_w, box_h = right - left, bottom - top
    if box_w * height > box_h * width:  # too wide: grow the height
        left, right, top, bottom = *(left, right), *_grow(top, bottom, round(box_w * height / width), h)
    else:
        left, right = _grow(left, right, round(box_h * width / height), w)
    return left, top, right, bottom


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """The span [lo, hi) grown about its centre to ``size`` (at most ``limit``), kept inside [0, limit)."""
    size = min(size, limit)
    lo = max(0, min(lo - (size - (hi - lo)) // 2, limit - size))
    return lo, lo + size


@dataclass(frozen=True)
class Canvas:
    """A run's image inputs at the generation size, and the picture its outputs are pasted back into."""

    image: torch.Tensor  # (1, 3, h, w) in [0, 1] at the generation size
    mask: torch.Tensor | None  # (1, 1, h, w) in [0, 1], blurred; None: img2img
    picture: torch.Tensor  # (1, 3, H, W) in [0, 1]: the (outpainted) picture at its own size
    picture_mask: torch.Tensor | None  # (1, 1, H, W) the blurred mask at the picture's size
    box: Box | None  # only masked: where the generated crop goes; None: the whole picture is generated

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) outputs → (B, 3, H, W) pictures: the crop scaled back into its box and composited through
        the mask (only masked), or the outputs themselves."""
        if self.box is None:
            return images
        left, top, right, bottom = self.box
        crop = images
        if images.shape[-2:] != (bottom - top, right - left):
            crop = F.interpolate(images, size=(bottom - top, right - left), mode="bicubic", antialias=True).clamp(0, 1)
        out = self.picture.expand(len(images), -1, -1, -1).clone()
        region = out[..., top:bottom, left:right]
        alpha = self.picture_mask[..., top:bottom, left:right]
        out[..., top:bottom, left:right] = region * (1 - alpha) + crop * alpha
        return out


def outpaint(image: Image.Image, mask: Image.Image | None, margins: Box) -> tuple[Image.Image, Image.Image]:
    """The canvas grown by ``margins`` (filled with the nearest edge pixels) and its mask: the margins white, the
    picture's own region as the user's mask (black without one)."""
    left, top, right, bottom = margins
    width, height = image.width + left + right, image.height + top + bottom
    canvas = _pad_edges(image, width, height, (left, top))
    grown = Image.new("L", (width, height), 255)
    grown.paste(mask if mask is not None else Image.new("L", image.size, 0), (left, top))
    return canvas, grown


def prepare(image: Image.Image, mask: Image.Image | None, *, width: int, height: int, resize: ResizeMode = ResizeMode.CROP,
            mask_blur: int = 0, outpaint_margins: Box | None = None, only_masked: bool = False,
            padding: int = 32) -> Canvas:  # fmt: skip
    """The :class:`Canvas` of one picture (RGB) and its mask (one channel, or None for img2img), for a generation
    at ``width``×``height``."""
    if mask is not None and mask.size != image.size:
        warnings.warn(f"the mask is {mask.width}×{mask.height}, the image {image.width}×{image.height}; the mask is "
                      "resized to the image", stacklevel=2)  # fmt: skip
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    if outpaint_margins is not None:
        image, mask = outpaint(image, mask, outpaint_margins)
    if mask is not None and not np.any(np.asarray(mask) >= 128):
        raise LdmError("the mask has no white pixel, so there is nothing to repaint; white (≥ 50 % grey) marks the "
                       "region to repaint")  # fmt: skip
    if mask is None:
        if only_masked:
            raise LdmError("--only-masked needs a mask: pass --mask FILE (or --outpaint)")
        picture = uint8_to_unit(pil_to_uint8(fit(image, width, height, resize)))[None]  # (1, 3, h, w)
        return Canvas(image=picture, mask=None, picture=picture, picture_mask=None, box=None)
    blurred = mask.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur > 0 else mask
    picture = uint8_to_unit(pil_to_uint8(image))[None]  # (1, 3, H, W)
    picture_mask = uint8_to_unit(torch.from_numpy(np.asarray(blurred).copy()))[None, None]
    if only_masked:
        box = crop_region(np.asarray(mask) >= 128, padding, width, height)
    else:
        box = (0, 0, image.width, image.height)
    crop = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    crop_mask = blurred.crop(box).resize((width, height), Image.Resampling.BILINEAR)
    return Canvas(
        image=uint8_to_unit(pil_to_uint8(crop))[None],
        mask=uint8_to_unit(torch.from_numpy(np.asarray(crop_mask).copy()))[None, None],
        picture=picture, picture_mask=picture_mask, box=box,
    )  # fmt: skip
