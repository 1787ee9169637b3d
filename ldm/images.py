"""Image files and pixels: open one and say what is wrong with it, turn it into 8-bit RGB, fit, load and save.

Problems that make an image unusable (:class:`Problem`) are reported, never raised. Modes other than RGB
are converted: alpha (RGBA, LA, PA, palette or grey with a transparent colour) is composited on white,
16-bit grey (``I;16``, ``I``) is scaled to 8 bits, CMYK / palette / grey / 1-bit go through Pillow.

This is the one home of the pixel conversions and of the crops and resizes, so that every command turns an image
into numbers, and numbers back into an image, the same way. Pixels come in three ranges:

- **uint8**: 0…255, (3, H, W), as stored in image files;
- **unit**: float in [0, 1], what the metrics, the CLIP scorers and the sampling loop's output use;
- **signed**: float in [-1, 1], what the VAE takes and gives.
"""

from __future__ import annotations

import enum
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import LdmError
from ldm.io import atomic_write

if TYPE_CHECKING:
    import torch

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SIZE_FLAGS = "--size N (python -m ldm eval: --vae-size N)"  # the flags that resize images on the way in

Size = tuple[int, int]  # (width, height) in pixels


class Problem(enum.Enum):
    """Why an image file is skipped. The value is how the report names it."""

    ZERO_SIZE = "zero-size file"
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    TINY = "too small"


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """What :func:`inspect_image` learnt about one file."""

    path: Path
    problem: Problem | None = None
    detail: str = ""  # e.g. "not an image", "1×1"
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation
    mode: str | None = None  # Pillow mode as stored in the file, e.g. "RGB", "CMYK", "I;16"
    digest: str | None = None  # sha256 of the file's bytes

    @property
    def min_side(self) -> int:
        return min(self.size) if self.size else 0


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha composited on white, 16-bit scaled down, other modes converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)  # (H, W), 0..65535
        image = Image.fromarray(np.round(values.clip(0, 65535) / 257).astype(np.uint8), mode="L")
    if image.mode == "RGB":
        return image
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _decode(data: bytes) -> tuple[Image.Image, str]:
    """Fully decode ``data``; returns the upright image and the mode stored in the file."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mode = image.mode
        upright = ImageOps.exif_transpose(image)
    return upright, mode


def open_rgb(path: str | Path) -> Image.Image:
    """Read ``path`` as an upright 8-bit RGB image (raises on a bad file; :func:`inspect_image` first)."""
    return decode_rgb(Path(path).read_bytes())


def decode_rgb(data: bytes) -> Image.Image:
    """An image file's bytes as an upright 8-bit RGB image (raises on bad bytes)."""
    image, _ = _decode(data)
    return to_rgb(image)


def read_image_file(path: str | Path, *, what: str = "image") -> tuple[Image.Image, str]:
    """The upright image in ``path`` as stored (its mode kept) and the sha256 of its bytes; a missing or undecodable
    file is a one-line :class:`LdmError` naming ``what`` it was meant to be."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LdmError(f"the {what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise LdmError(f"the {what} {path} is a folder; pass an image file") from None
    except OSError as exc:
        raise LdmError(f"cannot read the {what} {path} ({exc.strerror or exc}); check its permissions") from None
    try:
        image, _ = _decode(data)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        kind = "truncated" if "truncated" in str(exc) else "not a readable image"
        raise LdmError(f"the {what} {path} is {kind}; pass a PNG, JPEG or WebP file") from None
    if image.width > MAX_SIDE or image.height > MAX_SIDE:
        raise LdmError(f"the {what} {path} is {image.width}×{image.height}, larger than {MAX_SIDE} pixels a side; "
                       "scale it down first")  # fmt: skip
    return image, hashlib.sha256(data).hexdigest()


def inspect_image(path: str | Path, *, min_side: int = 1, read: Callable[[], bytes] | None = None) -> ImageInfo:
    """Read and fully decode ``path``, classifying it. Never raises for a bad image file. ``read``: how to get the
    bytes when they are not the file ``path`` (a member of a tar shard, which ``path`` then only names)."""
    path = Path(path)
    try:
        data = read() if read is not None else path.read_bytes()
    except OSError as exc:
        return ImageInfo(path=path, problem=Problem.UNREADABLE, detail=exc.strerror or type(exc).__name__)
    if not data:
        return ImageInfo(path=path, problem=Problem.ZERO_SIZE)
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, mode = _decode(data)
        to_rgb(image)
    except UnidentifiedImageError:
        return ImageInfo(path=path, problem=Problem.UNREADABLE, detail="not an image", digest=digest)
    except Image.DecompressionBombError:
        return ImageInfo(path=path, problem=Problem.UNREADABLE, detail="too many pixels", digest=digest)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        truncated = "truncat" in str(exc).lower() or isinstance(exc, EOFError)
        problem = Problem.TRUNCATED if truncated else Problem.UNREADABLE
        return ImageInfo(path=path, problem=problem, detail=str(exc).splitlines()[0][:80], digest=digest)
    info = ImageInfo(path=path, size=image.size, mode=mode, digest=digest)
    if info.min_side < min_side:
        return ImageInfo(
            path=path, problem=Problem.TINY, detail=f"{image.width}×{image.height}", size=image.size, mode=mode,
            digest=digest,
        )  # fmt: skip
    return info


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file → (3, H, W) uint8 RGB (alpha on white); an unreadable file is an :class:`LdmError`."""
    try:
        image = open_rgb(path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise LdmError(f"cannot read image {path} ({exc}); remove it or replace it") from None
    return pil_to_uint8(image)


def find_images(folder: str | Path, *, limit: int | None = None) -> list[Path]:
    """PNG, JPEG and WebP files under ``folder`` (recursively), sorted by path, the first ``limit`` of them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"{folder} is not a folder; pass a folder of PNG, JPEG or WebP images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise LdmError(f"no PNG, JPEG or WebP images in {folder} (searched recursively); pass another folder")
    return paths[:limit] if limit is not None else paths


# --- pixels: one conversion per pair of ranges ---------------------------------------------------------------------


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB image → (3, H, W) uint8."""
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def uint8_to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 → an RGB image."""
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (H, W, 3)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(..., H, W) unit pixels → uint8 of the same shape: clamped, ×255, rounded half to even.

    Rounding, not truncation: as diffusers' ``numpy_to_pil`` and PIL users do, so an image written here reads back
    as the nearest 8-bit value.
    """
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 unit pixels of the same shape (value / 255)."""
    return pixels.float() / 255


def uint8_to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 signed pixels of the same shape (value / 127.5 − 1)."""
    return pixels.float() / 127.5 - 1.0


def unit_to_signed(images: torch.Tensor) -> torch.Tensor:
    """(..., H, W) unit pixels → signed pixels (2·x − 1, what the VAE encodes), in the input's dtype."""
    return 2.0 * images - 1.0


def signed_to_unit(images: torch.Tensor) -> torch.Tensor:
    """(..., H, W) signed pixels (a VAE's output) → float32 unit pixels on the CPU, contiguous.

    The affine map and the clamp run in the input's dtype, then the result is cast: a half-precision VAE's images
    keep the numbers they always had.
    """
    return (images / 2 + 0.5).clamp(0, 1).float().cpu().contiguous()  # a channels_last VAE answers channels_last


# --- fitting: resize and crop ---------------------------------------------------------------------------------------


def cover_size(size: Size, target: Size) -> Size:
    """The (width, height) that ``size`` is resized to, aspect kept, so that it just covers ``target``.

    ``size`` itself when one side already matches and the other covers; otherwise scaled by the larger of the two
    side ratios, each side rounded and never below the target's.
    """
    width, height = size
    tw, th = target
    scale = max(tw / width, th / height)
    if scale != 1:
        width, height = max(tw, round(width * scale)), max(th, round(height * scale))
    return width, height


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side → ``size`` (bicubic), then the centre ``size``×``size`` square."""
    width, height = cover_size(image.size, (size, size))
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre square crop, then an antialiased bilinear resize: (B, C, H, W) → (B, C, size, size).

    The tensor counterpart of :func:`fit_square`, used on unit pixels ready for a feature extractor; its numbers
    differ from :func:`fit_square`'s (crop before resize, bilinear rather than bicubic), so the two are kept apart.
    """
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class CropPlan:
    resized: Size  # the image is resized to this (width, height) first, aspect kept, covering the target
    box: tuple[int, int, int, int]  # then cropped to (left, top, right, bottom)
    flip: bool  # then mirrored left-right


def plan_crop(
    size: Size, target: Size, *, center_crop: bool, flip_p: float, generator: torch.Generator | None
) -> CropPlan:
    """Where ``size`` is cropped to cover ``target``; draws exactly three numbers (top, left, flip) from
    ``generator`` (None: torch's global generator) whatever the settings, so turning one option off does not shift
    the others."""
    import torch

    width, height = cover_size(size, target)
    tw, th = target
    top = int(torch.randint(0, height - th + 1, (), generator=generator))
    left = int(torch.randint(0, width - tw + 1, (), generator=generator))
    flip = bool(torch.rand((), generator=generator) < flip_p)
    if center_crop:
        top, left = (height - th) // 2, (width - tw) // 2
    return CropPlan(resized=(width, height), box=(left, top, left + tw, top + th), flip=flip)


def crop_tensor(image: Image.Image, plan: CropPlan) -> torch.Tensor:
    """Apply ``plan`` to an RGB image (bicubic resize, crop, flip): (3, H, W) signed pixels."""
    if image.size != plan.resized:
        image = image.resize(plan.resized, Image.Resampling.BICUBIC)
    image = image.crop(plan.box)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return uint8_to_signed(pil_to_uint8(image))  # (3, H, W)


def fit_tensor(
    image: Image.Image, target: Size, *, center_crop: bool = True, flip_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """``image`` resized to cover ``target`` (width, height), cropped and maybe flipped: (3, H, W) signed pixels.

    The crop and flip are drawn from ``generator``; without one, from a fresh generator seeded with 0.
    """
    import torch

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return crop_tensor(
        image, plan_crop(image.size, target, center_crop=center_crop, flip_p=flip_p, generator=generator)
    )


# --- loading and saving ---------------------------------------------------------------------------------------------


MAX_SIDE = 16384  # pixels: the largest side anything is made or resized to; larger ones are typos, and take days


def check_size(size: int | None, *, factor: int) -> None:
    """Reject a ``--size`` that is not a positive multiple of ``factor``, the VAE's downsampling factor."""
    if size is not None and size > MAX_SIDE:
        raise LdmError(f"--size must be at most {MAX_SIDE} pixels, got {size}")
    if size is not None and (size < factor or size % factor):
        fix = max(factor, size // factor * factor)
        raise LdmError(f"--size must be a positive multiple of {factor} (the VAE's downsampling factor), got {size}; "
                       f"try {fix}")  # fmt: skip


def load_image(path: str | Path, *, factor: int, size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file → float32 (3, H, W) signed pixels and its (width, height) before any resize.

    Converted to RGB (alpha on white); with ``size``, resized and centre-cropped to ``size``×``size``. Each side must
    be a multiple of ``factor``, the downsampling factor of the VAE the image is for.
    """
    path = Path(path)
    if not path.exists():
        raise LdmError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise LdmError(f"{path} is a folder; pass image files (or use `python -m ldm vae eval {path}`)")
    info = inspect_image(path)
    if info.problem is not None:
        detail = f", {info.detail}" if info.detail else ""
        raise LdmError(f"{path} is not a usable image ({info.problem.value}{detail}); pass PNG, JPEG or WebP files")
    image = open_rgb(path)
    original = image.size
    if size is not None:
        check_size(size, factor=factor)
        image = fit_square(image, size)
    width, height = image.size
    if width % factor or height % factor:
        fix = f"{max(factor, width // factor * factor)}×{max(factor, height // factor * factor)}"
        raise LdmError(
            f"{path} is {width}×{height}, not a multiple of {factor} on each side; resize with {SIZE_FLAGS} or crop to "
            f"{fix}"
        )
    return uint8_to_signed(pil_to_uint8(image)), original


def iter_batches(paths: Sequence[Path], *, factor: int, size: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) signed batches of consecutive same-sized images (at most ``batch_size`` each), in order;
    ``factor`` and ``size`` as for :func:`load_image`."""
    import torch

    batch: list[torch.Tensor] = []
    for path in paths:
        pixels, _ = load_image(path, factor=factor, size=size)  # (3, H, W)
        if batch and (len(batch) == batch_size or batch[0].shape != pixels.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(pixels)
    if batch:
        yield torch.stack(batch)


def save_png(path: Path, image: torch.Tensor) -> Path:
    """(3, H, W) unit pixels → an 8-bit RGB PNG, written atomically."""
    picture = uint8_to_pil(to_uint8(image))
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def output_names(sources: Sequence[str]) -> list[str]:
    """One PNG name per source, named after it (``cat.jpg`` → ``cat.png``); repeats get ``-1``, ``-2``, ..."""
    names, seen = [], set()
    for source in sources:
        stem, name, n = Path(source).stem or "image", "", 0
        while not name or name in seen:
            name = f"{stem}.png" if n == 0 else f"{stem}-{n}.png"
            n += 1
        seen.add(name)
        names.append(name)
    return names
