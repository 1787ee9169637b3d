"""The scan report: exact counts of every planted problem, in every layout, and RGB conversion."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from ldm.data import DataConfig, Layout, Problem, inspect_image, list_dataset, report_dataset, scan_dataset, to_rgb
from ldm.data.scan import ScanShare
from ldm.errors import LdmError


def test_counts_for_each_layout(planted, expected):
    root, layout = planted
    report = scan_dataset(DataConfig(path=str(root), resolution=64), workers=2, progress=False)
    assert report.layout is layout
    assert report.images == expected["images"]
    assert report.captions == expected["captions"]
    assert report.usable == expected["usable"]
    assert len(report.missing_captions) == expected["missing_captions"]
    assert len(report.missing_images) == expected["missing_images"]
    assert report.count(Problem.ZERO_SIZE) == expected["zero_size"]
    assert report.count(Problem.UNREADABLE) == expected["unreadable"]
    assert report.count(Problem.TRUNCATED) == expected["truncated"]
    assert report.count(Problem.TINY) == expected["tiny"]
    assert report.empty_captions == expected["empty_captions"]
    assert dict(report.modes) == expected["modes"]
    assert report.duplicate_files == expected["duplicate_files"]
    assert dict(report.size_histogram) == expected["histogram"]
    assert report.upscaled == 8  # all but good2.jpg (64×64) are below 64 px
    assert report.skipped_images == 5
    assert report.bad_rows == ()
    # The right files land in the right buckets.
    names = {problem: [i.path.name for i in infos] for problem, infos in report.problems.items()}
    assert names == {
        Problem.ZERO_SIZE: ["zero.png"],
        Problem.UNREADABLE: ["text.png"],
        Problem.TRUNCATED: ["trunc.jpg"],
        Problem.TINY: ["tiny.png"],
    }
    assert sorted(p.image.name for p in report.pairs) == [
        "cmyk.jpg", "dup.png", "empty.png", "good1.png", "good2.jpg", "good3.png", "gray16.png", "pal.png", "rgba.png",
    ]  # fmt: skip
    assert [sorted(p.name for p in group) for group in report.duplicates] == [["dup.png", "good1.png"]]


def test_a_scan_shared_by_processes_is_the_scan_of_one(planted):
    """Three processes (threads here, meeting at a barrier as a collective would), each decoding every third image,
    all end with the report one process makes: the same pairs, problems, sizes and duplicates, and the same text."""
    root, _ = planted
    config = DataConfig(path=str(root), resolution=64)
    whole = scan_dataset(config, workers=1, progress=False)
    barrier, parts, reports, decoded = threading.Barrier(3), [None] * 3, [None] * 3, [0] * 3

    def gather(rank):
        def collective(obj):
            decoded[rank] = len(obj)
            parts[rank] = obj
            barrier.wait()
            return list(parts)
        return collective

    def process(rank):
        reports[rank] = scan_dataset(config, workers=1, progress=False, share=ScanShare(rank, 3, gather(rank)))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(decoded) == len({pair.image for pair in list_dataset(config).pairs}) and min(decoded) > 0  # once each
    for report in reports:
        assert report.pairs == whole.pairs and report.sizes == whole.sizes and report.problems == whole.problems
        assert report.duplicates == whole.duplicates and report.format() == whole.format()


def test_report_text(planted):
    root, layout = planted
    text = scan_dataset(DataConfig(path=str(root), resolution=64), progress=False).format()
    lines = {line.strip().split("  ")[0]: line for line in text.splitlines()[1:]}
    assert text.splitlines()[0].startswith(f"dataset {root} (layout {layout.value}")
    assert lines["usable pairs"].split()[2] == "9"
    nocap = "shard-000.tar/nocap.png" if layout is Layout.WEBDATASET else "nocap.png"
    assert lines["missing caption"].split()[2:] == ["1", "e.g.", nocap]
    assert "text.png (not an image)" in lines["unreadable"]
    assert "tiny.png (1×1)" in lines["too small (<32 px)"]
    assert lines["converted to RGB"].endswith("4   CMYK 1, I;16 1, P 1, RGBA 1")
    assert "kept: trained as unconditional samples" in lines["empty captions"]
    assert "shorter side <64: 8 | 64-127: 1 | 128-255: 0" in text


def test_min_side_is_configurable(planted):
    root, _ = planted
    report = scan_dataset(DataConfig(path=str(root), min_side=45), progress=False)
    tiny = sorted(i.path.name for i in report.problems[Problem.TINY])
    # Shorter sides: good1/dup 40, 40×40 ones, good3 50, good2 64.
    assert tiny == ["cmyk.jpg", "dup.png", "empty.png", "good1.png", "gray16.png", "pal.png", "rgba.png", "tiny.png"]
    assert report.usable == 2


def test_report_dataset_prints_and_returns(planted):
    root, _ = planted
    out = io.StringIO()
    report = report_dataset(DataConfig(path=str(root)), file=out, progress=False)
    assert report.usable == 9
    assert out.getvalue().strip() == report.format()


def test_report_dataset_fails_when_nothing_is_usable(tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    (tmp_path / "a.txt").write_text("a caption")
    out = io.StringIO()
    with pytest.raises(LdmError, match="no usable image/caption pairs in .*; fix the problems listed in the report above"):
        report_dataset(DataConfig(path=str(tmp_path)), file=out, progress=False)
    assert "unreadable" in out.getvalue()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue → white
    image.putpixel((1, 0), (0, 0, 255, 128))  # half blue
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (127, 127, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # (1, 4)
    rgb = to_rgb(Image.fromarray(values))
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_palette_and_cmyk_become_rgb(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    info = inspect_image(tmp_path / "c.jpg", min_side=32)
    assert (info.problem, info.mode, info.size) == (None, "CMYK", (40, 40))
    red = to_rgb(Image.open(tmp_path / "c.jpg")).getpixel((20, 20))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    palette = Image.new("RGB", (4, 4), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
