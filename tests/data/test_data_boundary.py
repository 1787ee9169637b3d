"""The dataset boundary: nothing outside the folder is opened, and captions that are not UTF-8 are counted."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.data.scan as scan_module
from ldm.data import DataConfig, Layout, scan_dataset
from ldm.errors import LdmError

BAD_UTF8 = b"caf\xe9 au lait"  # Latin-1 bytes: not UTF-8


def picture(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files beside the dataset that a crafted caption table or link points at."""
    return picture(tmp_path / "outside" / "secret.png", 9)


def write_table(root: Path, layout: Layout, rows: list[tuple[str, bytes]]) -> None:
    """A caption table whose cells are raw bytes (so that invalid UTF-8 reaches the file as it is)."""
    if layout is Layout.IMAGEFOLDER:
        lines = [json.dumps({"file_name": name, "text": "@@"}).encode().replace(b"@@", caption) for name, caption in rows]
        (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows((name, f"@@{i}@@") for i, (name, _) in enumerate(rows))
        data = (root / "metadata.csv").read_bytes()
        for i, (_, caption) in enumerate(rows):
            data = data.replace(b"@@%d@@" % i, caption)
        (root / "metadata.csv").write_bytes(data)


def crafted(root: Path, outside: Path, layout: Layout) -> Path:
    """Two good pairs, an undecodable caption, and four ways out of the folder."""
    for i, name in enumerate(["good1.png", "good2.png", "latin.png"]):
        picture(root / name, i)
    os.symlink(outside, root / "linked.png")  # a link inside that leads out
    if layout is Layout.KOHYA:
        (root / "good1.txt").write_text("red apple")
        (root / "good2.txt").write_text("green pear")
        (root / "latin.txt").write_bytes(BAD_UTF8)
        (root / "linked.txt").write_text("a link")
        picture(root / "captionlink.png", 5)
        os.symlink(outside.with_suffix(".txt"), root / "captionlink.txt")  # the caption file leads out
        outside.with_suffix(".txt").write_text("secret caption")
        return root
    write_table(root, layout, [
        ("good1.png", b"red apple"), ("good2.png", b"green pear"), ("latin.png", BAD_UTF8),
        ("../outside/secret.png", b"a way up"), (str(outside), b"an absolute path"), ("/etc/hostname", b"system"),
        ("linked.png", b"a link"), ("sub/../../outside/secret.png", b"a way round"),
    ])  # fmt: skip
    return root


@pytest.mark.parametrize("layout", [Layout.IMAGEFOLDER, Layout.CSV, Layout.KOHYA], ids=lambda x: x.value)
def test_nothing_outside_is_opened_and_bad_utf8_is_counted(tmp_path, outside, layout, monkeypatch):
    root = crafted(tmp_path / "data", outside, layout)
    opened = []
    real = scan_module.inspect_image
    monkeypatch.setattr(scan_module, "inspect_image", lambda path, **kw: opened.append(Path(path)) or real(path, **kw))
    report = scan_dataset(DataConfig(path=str(root), layout=layout), workers=1, progress=False)
    assert sorted(p.image.name for p in report.pairs) == ["good1.png", "good2.png"]
    assert [p.caption for p in sorted(report.pairs, key=lambda p: p.image.name)] == ["red apple", "green pear"]
    assert [p.name for p in report.undecodable] == ["latin.png"]  # counted, not repaired with U+FFFD
    expected = (
        {"linked.png", "captionlink.txt"} if layout is Layout.KOHYA else
        {"../outside/secret.png", str(outside), "/etc/hostname", "linked.png", "sub/../../outside/secret.png"}
    )  # fmt: skip
    assert set(report.outside) == expected
    assert all(path.resolve().is_relative_to(root.resolve()) for path in opened), opened
    assert report.skipped_images == 1 + (1 if layout is Layout.KOHYA else 0)  # latin.png (+ the link-captioned one)
    text = report.format()
    assert re.search(rf"outside the dataset +{len(expected)} .*\(never opened\)", text), text
    assert "caption not UTF-8" in text and "latin.png" in text


def test_a_caption_table_outside_the_folder_is_refused(tmp_path, outside):
    root = tmp_path / "data"
    picture(root / "a.png", 0)
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(LdmError, match="lies outside the dataset folder"):
        scan_dataset(DataConfig(path=str(root), metadata="../elsewhere.jsonl"), progress=False)
