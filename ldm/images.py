"""Image files and pixels: open one and say what is wrong with it, turn it into 8-bit RGB, fit, load and save.

Problems that make an image unusable (:class:`Problem`) are reported, never raised. Modes other than RGB
are converted: alpha (RGBA, LA, PA, palette or grey with a transparent colour) is composited on white,
16-bit grey (``I;16``, ``I``) is scaled to 8 bits, CMYK / palette / grey / 1-bit go through Pillow.
"""

from __future__ import annotations

import enum
import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import LdmError
from ldm.io import atomic_write

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
FACTOR = 8  # pixels per latent cell (AutoencoderConfig insists on a downsampling factor of 8)
SIZE_FLAGS = "--size N (python -m ldm eval: --vae-size N)"  # the flags that resize images on the way in


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
    image, _ = _decode(Path(path).read_bytes())
    return to_rgb(image)


def inspect_image(path: str | Path, *, min_side: int = 1) -> ImageInfo:
    """Read and fully decode ``path``, classifying it. Never raises for a bad image file."""
    path = Path(path)
    try:
        data = path.read_bytes()
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
def find_images(folder: str | Path, *, limit: int | None = None) -> list[Path]:
    """PNG, JPEG and WebP files under ``folder`` (recursively), sorted by path, the first ``limit`` of them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"{folder} is not a folder; pass a folder of PNG, JPEG or WebP images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise LdmError(f"no PNG, JPEG or WebP images in {folder} (searched recursively); pass another folder")
    return paths[:limit] if limit is not None else paths


def iter_batches(paths: Sequence[Path], *, size: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) batches in [-1, 1] of consecutive same-sized images (at most ``batch_size`` each), in order."""
    batch: list[torch.Tensor] = []
    for path in paths:
        pixels, _ = load_image(path, size=size)  # (3, H, W)
        if batch and (len(batch) == batch_size or batch[0].shape != pixels.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(pixels)
    if batch:
        yield torch.stack(batch)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side → ``size`` (bicubic), then the centre ``size``×``size`` square."""
    width, height = image.size
    if min(width, height) != size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def check_size(size: int | None) -> None:
    if size is not None and (size < FACTOR or size % FACTOR):
        fix = max(FACTOR, size // FACTOR * FACTOR)
        raise LdmError(f"--size must be a positive multiple of {FACTOR}, got {size}; try {fix}")


def load_image(path: str | Path, *, size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file → float32 (3, H, W) in [-1, 1] and its (width, height) before any resize.

    Converted to RGB (alpha on white); with ``size``, resized and centre-cropped to ``size``×``size``.
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
        check_size(size)
        image = fit_square(image, size)
    width, height = image.size
    if width % FACTOR or height % FACTOR:
        fix = f"{max(FACTOR, width // FACTOR * FACTOR)}×{max(FACTOR, height // FACTOR * FACTOR)}"
        raise LdmError(
            f"{path} is {width}×{height}, not a multiple of {FACTOR} on each side; resize with {SIZE_FLAGS} or crop to "
            f"{fix}"
        )
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    return pixels.float() / 127.5 - 1.0, original


def save_png(path: Path, image: torch.Tensor) -> Path:
    """(3, H, W) in [0, 1] → an 8-bit RGB PNG, written atomically."""
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
    return atomic_write(path, lambda tmp: Image.fromarray(array, mode="RGB").save(tmp, format="PNG"))


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
