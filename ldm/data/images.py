"""Open one image file, say what is wrong with it, and turn it into 8-bit RGB.

Problems that make an image unusable (:class:`Problem`) are reported, never raised. Modes other than RGB
are converted: alpha (RGBA, LA, PA, palette or grey with a transparent colour) is composited on white,
16-bit grey (``I;16``, ``I``) is scaled to 8 bits, CMYK / palette / grey / 1-bit go through Pillow.
"""

from __future__ import annotations

import enum
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


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
