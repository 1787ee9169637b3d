"""A small dataset folder with planted problems, written in any of the four layouts (shared by the tests).

Files (all captioned unless said otherwise; min side 32 px is the default threshold):

    good1.png 48×40 RGB      good2.jpg 64×64 RGB      sub/good3.png 100×50 RGB (subfolder)
    dup.png   copy of good1.png (exact duplicate)      empty.png 40×40 RGB, caption ''
    cmyk.jpg  40×40 CMYK     rgba.png 40×40 RGBA      gray16.png 40×40 16-bit grey (I;16)
    pal.png   40×40 palette (P)
    nocap.png 40×40 RGB, no caption          trunc.jpg  JPEG cut in half
    text.png  a text file named .png         tiny.png   1×1
    zero.png  0 bytes
    plus one caption naming gone.png, which does not exist.

As webdataset shards: the kohya files packed into shard-000.tar (top level) and shard-001.tar (sub/), nothing loose.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data import Layout

CAPTIONS = {
    "good1.png": "a red square",
    "good2.jpg": "noise, in a jpeg",
    "sub/good3.png": "a wide   blue\nthing",  # whitespace collapses to "a wide blue thing"
    "dup.png": "the same red square",
    "empty.png": "",
    "cmyk.jpg": "a cmyk picture",
    "rgba.png": "a see-through square",
    "gray16.png": "a sixteen bit ramp",
    "pal.png": "a palette image",
    "trunc.jpg": "a truncated jpeg",
    "text.png": "not really an image",
    "tiny.png": "one pixel",
    "zero.png": "nothing at all",
    "gone.png": "an image that is not there",
}
UNCAPTIONED = ["nocap.png"]

# What scan_dataset must find, whatever the layout.
EXPECTED = {
    "images": 14,
    "captions": 13,  # caption entries whose image exists (gone.png does not)
    "usable": 9,
    "missing_captions": 1,
    "missing_images": 1,
    "zero_size": 1,
    "unreadable": 1,
    "truncated": 1,
    "tiny": 1,
    "empty_captions": 1,
    "modes": {"CMYK": 1, "I;16": 1, "P": 1, "RGBA": 1},
    "duplicate_files": 1,
    "histogram": {"<64": 8, "64-127": 1, "128-255": 0, "256-511": 0, "512-1023": 0, ">=1024": 0},
}


def name_in_dataset(image: Path, root: Path) -> str:
    """The planted name of a listed image: its path under ``root``, less the shard it lies in (webdataset)."""
    parts = image.relative_to(root).parts
    return "/".join(parts[1:] if parts[0].endswith(".tar") else parts)


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # (H, W, 3)


def png_bytes(seed: int, size: int = 8) -> bytes:
    """A small noise PNG, as the bytes of its file."""
    buffer = io.BytesIO()
    Image.fromarray(noise(size, size, seed)).save(buffer, "PNG")
    return buffer.getvalue()


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """An uncompressed tar of plain-file ``members`` (name, bytes), names written as given (``../x`` too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_images(root: Path) -> None:
    """Write the image files (no captions) under ``root``."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), (220, 30, 30)).save(root / "good1.png")
    Image.fromarray(noise(64, 64, 1)).save(root / "good2.jpg", quality=90)
    Image.new("RGB", (100, 50), (20, 40, 200)).save(root / "sub/good3.png")
    shutil.copyfile(root / "good1.png", root / "dup.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(root / "empty.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(root / "rgba.png")
    ramp = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)  # (40, 40), 0..63960
    Image.fromarray(ramp).save(root / "gray16.png")
    Image.new("RGB", (40, 40), (200, 100, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "pal.png")
    Image.new("RGB", (40, 40), (90, 90, 90)).save(root / "nocap.png")
    jpeg = io.BytesIO()
    Image.fromarray(noise(64, 64, 2)).save(jpeg, "JPEG", quality=95)
    (root / "trunc.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "text.png").write_text("this is a text file, not a PNG\n")
    Image.new("RGB", (1, 1), (0, 0, 0)).save(root / "tiny.png")
    (root / "zero.png").write_bytes(b"")


def write_captions(root: Path, layout: Layout) -> None:
    if layout is Layout.IMAGEFOLDER:
        lines = [json.dumps({"file_name": name, "text": text}) for name, text in CAPTIONS.items()]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    elif layout is Layout.CSV:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows(CAPTIONS.items())
    else:
        for name, text in CAPTIONS.items():
            (root / name).with_suffix(".txt").write_text(text)
        if layout is Layout.WEBDATASET:
            pack_shards(root)


def pack_shards(root: Path) -> None:
    """Move the files under ``root`` into two tar shards: top-level files in shard-000.tar, sub/ in shard-001.tar."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".tar")
    for shard, group in (("shard-000.tar", [f for f in files if f.parent == root]),
                         ("shard-001.tar", [f for f in files if f.parent != root])):  # fmt: skip
        with tarfile.open(root / shard, "w") as tar:
            for file in group:
                tar.add(file, arcname=file.relative_to(root).as_posix())
    for file in files:
        file.unlink()
    (root / "sub").rmdir()


def build_dataset(root: Path, layout: Layout | None) -> Path:
    """The planted-problem folder in ``layout`` at ``root`` (``None``: images only); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    write_images(root)
    if layout is not None:
        write_captions(root, layout)
    return root
