"""generate.py's image inputs: img2img, inpainting, outpainting and upscaling flags, read and checked, and what the
PNG records of them so that ``--from-png`` makes the same pixels (files by path and sha256).

The pixel work is :mod:`ldm.pipeline.canvas`; the sampling is :mod:`ldm.pipeline.modes`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm.config import show
from ldm.errors import LdmError
from ldm.formats.bundle import read_config
from ldm.formats.pngmeta import ImageParameters
from ldm.images import MAX_SIDE, read_image_file, to_rgb
from ldm.models.presets import ModelConfig, Task
from ldm.pipeline.canvas import Box, Canvas, ResizeMode, mask_from_image, prepare
from ldm.pipeline.modes import DEFAULT_NOISE_LEVEL, DEFAULT_STRENGTH, Fill

DEFAULT_MASK_BLUR = 4  # pixels, A1111's default
DEFAULT_PADDING = 32  # pixels around the mask with --only-masked, A1111's default
DEFAULT_UPSCALE_STEPS = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("img2img and inpainting")
    g.add_argument("--init-image", type=Path, metavar="FILE",
                   help="start from this image (img2img); with --mask, the image to inpaint")  # fmt: skip
    g.add_argument("--strength", type=float, default=None, metavar="S",
                   help=f"denoising strength in [0, 1]: how much of the image is redrawn; 1 ignores it, 0 keeps it "
                        f"(default {DEFAULT_STRENGTH}; 1 with --outpaint)")  # fmt: skip
    g.add_argument("--resize", choices=[m.value for m in ResizeMode], default=None,
                   help="how the image meets --width/--height: crop (cover, centre crop; default), fill (fit, edges "
                        "stretched into the rest) or stretch")  # fmt: skip
    g.add_argument("--mask", type=Path, metavar="FILE", help="inpainting mask: white = repaint, black = keep")
    g.add_argument("--mask-blur", type=int, default=None, metavar="PX",
                   help=f"soften the mask's edge for the final blend, in pixels (default {DEFAULT_MASK_BLUR})")
    g.add_argument("--masked-content", choices=[f.value.replace(" ", "-") for f in Fill], default=None,
                   help="what the masked region starts from below strength 1: original (default), latent-noise, "
                        "latent-nothing")  # fmt: skip
    g.add_argument("--only-masked", action=argparse.BooleanOptionalAction, default=None,
                   help="inpaint only the mask's region, cut out and generated at the full --width/--height, then "
                        "pasted back: detail for small regions of large images")  # fmt: skip
    g.add_argument("--masked-padding", type=int, default=None, metavar="PX",
                   help=f"with --only-masked: context around the mask, in pixels (default {DEFAULT_PADDING})")
    g.add_argument("--outpaint", default=None, metavar="L,T,R,B",
                   help="extend the canvas by these many pixels left, top, right and bottom, and paint the new border "
                        "(needs --init-image)")  # fmt: skip
    u = p.add_argument_group("upscaling")
    u.add_argument("--upscale", type=Path, metavar="BUNDLE",
                   help="upscale every image with this upscaler bundle (train_unet.py --task upscale)")
    u.add_argument("--upscale-steps", type=int, default=None,
                   help=f"sampling steps of the upscaler (default {DEFAULT_UPSCALE_STEPS})")
    u.add_argument("--noise-level", type=int, default=None,
                   help=f"noise added to the upscaler's input: more hides its flaws, less keeps its detail "
                        f"(default {DEFAULT_NOISE_LEVEL})")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ImageFile:
    """An input file, read: the path as given, the sha256 of its bytes, the image."""

    path: Path
    digest: str
    image: Image.Image


@dataclass(frozen=True, kw_only=True)
class ImageInputs:
    """The run's img2img / inpainting inputs, checked; :meth:`canvas` builds the tensors once the size is known."""

    init: ImageFile
    mask: ImageFile | None
    strength: float
    resize: ResizeMode
    mask_blur: int
    fill: Fill
    only_masked: bool
    padding: int
    outpaint: Box | None  # the margins as given; the canvas grows the right and bottom to the VAE's factor

    @property
    def inpaints(self) -> bool:
        return self.mask is not None or self.outpaint is not None

    def picture_size(self) -> tuple[int, int]:
        """The size of the picture the mask applies to: the image, grown by the outpainting margins."""
        w, h = self.init.image.size
        if self.outpaint is None:
            return w, h
        left, top, right, bottom = self.outpaint
        return w + left + right, h + top + bottom

    def default_size(self, config: ModelConfig) -> tuple[int, int]:
        """--width/--height when not given: the picture's size down (img2img; inpainting: to the nearest) multiple of
        the VAE's factor, or with --only-masked the model's own size (the crop is generated there)."""
        f = config.vae.downsampling_factor
        if self.only_masked:
            return config.default_size, config.default_size
        snap = (lambda side: round(side / f) * f) if self.inpaints else (lambda side: side // f * f)
        return tuple(max(f, snap(side)) for side in self.picture_size())  # type: ignore[return-value]

    def canvas(self, *, width: int, height: int) -> Canvas:
        mask = mask_from_image(self.mask.image) if self.mask else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            canvas = prepare(to_rgb(self.init.image), mask, width=width, height=height, resize=self.resize,
                             mask_blur=self.mask_blur, outpaint_margins=self.outpaint, only_masked=self.only_masked,
                             padding=self.padding)  # fmt: skip
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        return canvas

    def record(self) -> dict:
        """The ImageParameters entries of these inputs."""
        entries = dict(strength=self.strength, resize_mode=None if self.inpaints else self.resize.label,
                       init_image=str(self.init.path), init_image_hash=self.init.digest)  # fmt: skip
        if self.inpaints:
            entries |= dict(mask_blur=self.mask_blur, masked_content=self.fill.value, only_masked=self.only_masked,
                            masked_padding=self.padding if self.only_masked else None,
                            outpaint=",".join(map(str, self.outpaint)) if self.outpaint else None)  # fmt: skip
            if self.mask is not None:
                entries |= dict(mask=str(self.mask.path), mask_hash=self.mask.digest)
        return entries


def parse_margins(text: str) -> Box:
    parts = text.split(",")
    try:
        margins = tuple(int(p) for p in parts)
    except ValueError:
        margins = ()
    if len(margins) != 4 or min(margins) < 0 or max(margins) > MAX_SIDE or not any(margins):
        raise LdmError(f"--outpaint takes four whole numbers of pixels ≥ 0, not all 0: left,top,right,bottom; got "
                       f"{show(text)}; e.g. --outpaint 0,0,32,0 extends the right side")  # fmt: skip
    return margins  # type: ignore[return-value]


def read_input(path: Path, *, what: str, recorded_hash: str | None, png: Path | None) -> ImageFile:
    """Read an input file; one that ``--from-png`` names must still have the bytes the PNG recorded."""
    found = path
    if png is not None and not path.is_absolute() and not path.exists() and (png.parent / path).exists():
        found = png.parent / path  # recorded relative to where generate ran; also looked for beside the PNG
    image, digest = read_image_file(found, what=what)
    if recorded_hash is not None and digest != recorded_hash:
        raise LdmError(f"the {what} {found} changed since {png} was made (sha256 {recorded_hash[:12]}… recorded, "
                       f"{digest[:12]}… now); put the original back, or pass the new one explicitly to make a "
                       "different image")  # fmt: skip
    return ImageFile(path=path, digest=digest, image=image)


def resolve(args: argparse.Namespace, recorded: ImageParameters | None, png: Path | None) -> ImageInputs | None:
    """The image inputs from the flags, else from ``--from-png``'s record; None for text-to-image."""
    rec = recorded if recorded is not None and recorded.init_image is not None else None

    def pick(flag, recorded_value, default):
        value = getattr(args, flag)
        if value is not None:
            return value
        return recorded_value if rec is not None and recorded_value is not None else default

    init_path = args.init_image or (Path(rec.init_image) if rec else None)
    if init_path is None:
        for flag in ("strength", "mask", "resize", "mask_blur", "masked_content", "only_masked", "masked_padding",
                     "outpaint"):  # fmt: skip
            if getattr(args, flag) not in (None, False):
                raise LdmError(f"--{flag.replace('_', '-')} needs an image to work on; pass --init-image FILE")
        return None
    init = read_input(init_path, what="init image", png=png,
                      recorded_hash=rec.init_image_hash if rec and not args.init_image else None)  # fmt: skip
    mask_path = args.mask or (Path(rec.mask) if rec and rec.mask and not args.init_image else None)
    mask = None
    if mask_path is not None:
        mask = read_input(mask_path, what="mask", png=png,
                          recorded_hash=rec.mask_hash if rec and not args.mask else None)  # fmt: skip
    outpaint = parse_margins(args.outpaint) if args.outpaint else None
    if outpaint is None and rec and rec.outpaint and not args.init_image:
        outpaint = parse_margins(rec.outpaint)
    if mask is not None and outpaint is None and mask_from_image(mask.image).getextrema()[1] < 128:
        raise LdmError(f"the mask {mask.path} has no white pixel, so there is nothing to repaint; white (≥ 50 % grey) "
                       "marks the region to repaint")  # fmt: skip
    strength = pick("strength", rec.strength if rec else None, 1.0 if outpaint else DEFAULT_STRENGTH)
    if not 0.0 <= strength <= 1.0:
        raise LdmError(f"--strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {strength}; 0.75 is usual")
    mask_blur = pick("mask_blur", rec.mask_blur if rec else None, DEFAULT_MASK_BLUR)
    padding = pick("masked_padding", rec.masked_padding if rec else None, DEFAULT_PADDING)
    for flag, value in (("--mask-blur", mask_blur), ("--masked-padding", padding)):
        if not 0 <= value <= MAX_SIDE:
            raise LdmError(f"{flag} must be a number of pixels from 0 to {MAX_SIDE}, got {value}")
    if args.resize and (mask is not None or outpaint is not None):
        raise LdmError("--resize is for img2img; an inpainted picture keeps its own size (the output is scaled back "
                       "into it), so leave --resize out, or set --width/--height for the generation size")  # fmt: skip
    resize = args.resize or (ResizeMode.from_label(rec.resize_mode).value if rec and rec.resize_mode else "crop")
    fill = args.masked_content or (rec.masked_content if rec and rec.masked_content else "original")
    only_masked = pick("only_masked", rec.only_masked if rec else None, False)
    if only_masked and mask is None and outpaint is None:
        raise LdmError("--only-masked needs a mask: pass --mask FILE (or --outpaint)")
    return ImageInputs(init=init, mask=mask, strength=strength, resize=ResizeMode(resize), mask_blur=mask_blur,
                       fill=Fill(fill.replace("-", " ")), only_masked=bool(only_masked), padding=padding,
                       outpaint=outpaint)  # fmt: skip


def check_task(config: ModelConfig, model: Path, inputs: ImageInputs | None) -> None:
    """The model must be one generate.py can draw with, given these inputs."""
    if config.task is Task.UPSCALE:
        raise LdmError(f"{model} is an upscaler; pass it as --upscale {model} with a text-to-image --model, or run "
                       f"python -m ldm upscale IMAGE --model {model}")  # fmt: skip
    if config.task is Task.INPAINT and (inputs is None or not inputs.inpaints):
        raise LdmError(f"{model} is an inpainting model: pass --init-image FILE with --mask FILE (white = repaint) "
                       "or --outpaint")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class UpscaleSettings:
    bundle: Path
    config: ModelConfig
    steps: int
    noise_level: int


def resolve_upscale(args: argparse.Namespace, recorded: ImageParameters | None) -> UpscaleSettings | None:
    """--upscale and its settings (else --from-png's), checked against the upscaler's config."""
    path = args.upscale or (Path(recorded.upscaler) if recorded and recorded.upscaler else None)
    if path is None:
        for flag in ("upscale_steps", "noise_level"):
            if getattr(args, flag) is not None:
                raise LdmError(f"--{flag.replace('_', '-')} needs an upscaler: pass --upscale BUNDLE")
        return None
    config = read_config(path)
    if config.task is not Task.UPSCALE:
        raise LdmError(f"--upscale {path} is a {config.task.value} model, not an upscaler; pass a bundle made by "
                       "train_unet.py --task upscale")  # fmt: skip
    rec = recorded if recorded and recorded.upscaler and not args.upscale else None
    steps = args.upscale_steps or (rec.upscale_steps if rec else None) or DEFAULT_UPSCALE_STEPS
    level = args.noise_level if args.noise_level is not None else (rec.noise_level if rec else DEFAULT_NOISE_LEVEL)
    if steps < 1 or steps > config.schedule.num_train_timesteps:
        raise LdmError(f"--upscale-steps must be from 1 to {config.schedule.num_train_timesteps}, got {steps}")
    if not 0 <= level < config.unet.num_class_embeds:
        raise LdmError(f"--noise-level must be from 0 to {config.unet.num_class_embeds - 1}, got {level}; "
                       f"{DEFAULT_NOISE_LEVEL} is usual")  # fmt: skip
    return UpscaleSettings(bundle=path, config=config, steps=steps, noise_level=level)
