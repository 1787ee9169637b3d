"""kohya repeat folders (``10_apple/``): each image counted N times an epoch, and the report saying so."""

from __future__ import annotations

import json
from collections import Counter

from planted import write_png

from ldm.data import CaptionedImageDataset, DataConfig, list_dataset, scan_dataset
from ldm.data.scan import Repeats

FOLDERS = {"10_apple": 3, "2_pear": 2, "plain": 1}  # folder → images


def write_kohya(root, folders=FOLDERS):
    for f, (folder, n) in enumerate(folders.items()):
        for i in range(n):
            write_png(root / folder / f"{i}.png", 10 * f + i)
            (root / folder / f"{i}.txt").write_text(f"{folder} {i}")
    return root


def test_repeats_are_counted_in_the_pairs_and_the_dataset(tmp_path):
    root = write_kohya(tmp_path / "k")
    config = DataConfig(path=str(root), min_side=8, resolution=8)
    report = scan_dataset(config, progress=False)
    assert (report.images, report.captions, report.usable, len(report.distinct_pairs)) == (6, 6, 35, 6)
    assert Counter(p.image.parent.name for p in report.pairs) == {"10_apple": 30, "2_pear": 4, "plain": 1}
    assert report.repeats == (Repeats("10_apple", 3, 10), Repeats("2_pear", 2, 2))
    assert {p.caption for p in report.pairs if p.image.parent.name == "10_apple"} == {"10_apple 0", "10_apple 1",
                                                                                       "10_apple 2"}  # fmt: skip
    lines = [line.strip() for line in report.format().splitlines()]
    assert lines[3].split()[:3] == ["usable", "pairs", "35"] and "6 distinct, repeats counted" in lines[3]
    assert lines[4:7] == ["10_apple: 3 images × 10 repeats = 30", "2_pear: 2 images × 2 repeats = 4",
                          "other images: 1 image × 1 = 1"]  # fmt: skip
    dataset = CaptionedImageDataset(config, report=report)
    assert len(dataset) == 35 and dataset[29]["caption"] == "10_apple 2"


def test_skipped_images_are_not_repeated(tmp_path):
    root = write_kohya(tmp_path / "k", {"10_apple": 3})
    (root / "10_apple" / "1.png").write_bytes(b"")  # zero-size: skipped, so not trained 10 times
    report = scan_dataset(DataConfig(path=str(root), min_side=8), progress=False)
    assert report.usable == 20 and report.repeats == (Repeats("10_apple", 2, 10),)
    assert report.skipped_images == 1


def test_only_top_level_n_underscore_name_folders_repeat(tmp_path):
    folders = {"apple_10": 1, "10apple": 1, "3_x": 1, "3_x/5_deeper": 1, "0_off": 1, "007_bond": 1}
    root = write_kohya(tmp_path / "k", folders)
    listing = list_dataset(DataConfig(path=str(root)))
    assert {folder.name: n for folder, n in listing.repeats.items()} == {"007_bond": 7, "0_off": 0, "3_x": 3}
    times = {p.image.relative_to(root).parent.as_posix(): listing.repeats_of(p.image) for p in listing.pairs}
    assert times == {"apple_10": 1, "10apple": 1, "3_x": 3, "3_x/5_deeper": 3, "0_off": 0, "007_bond": 7}


def test_repeats_are_kohya_only(tmp_path):
    root = tmp_path / "d"
    write_png(root / "10_apple" / "a.png", 0)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "10_apple/a.png", "text": "an apple"}) + "\n")
    report = scan_dataset(DataConfig(path=str(root), min_side=8), progress=False)
    assert report.usable == 1 and report.repeats == ()
