"""The emoji dataset builder: captions, the fixed split, rendering, and the imagefolder it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm.data import DataConfig, Layout, scan_dataset
from ldm.data.emoji import (
    DEFAULT_FONT,
    EmojiConfig,
    EmojiRenderer,
    Skip,
    Split,
    build_emoji_dataset,
    candidates,
    caption_for,
    file_stem,
    split_of,
)
from ldm.errors import LdmError

REPO = Path(__file__).resolve().parents[2]
needs_font = pytest.mark.skipif(
    not DEFAULT_FONT.is_file(), reason=f"{DEFAULT_FONT} missing: apt-get install fonts-noto-color-emoji"
)
APPLE, JAPAN, KEYCAP_1, SMILING = "\U0001f34e", "\U0001f1ef\U0001f1f5", "1\ufe0f\u20e3", "\u263a\ufe0f"
THUMBS_MEDIUM = "\U0001f44d\U0001f3fd"
SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"


def test_captions_are_cldr_names():
    assert caption_for(APPLE) == "red apple"
    assert caption_for(JAPAN) == "flag: Japan"
    assert caption_for(SCOTLAND) == "flag: Scotland"
    assert caption_for(KEYCAP_1) == "keycap: 1"
    assert caption_for(THUMBS_MEDIUM) == "thumbs up medium skin tone"
    assert caption_for("\U0001f3f3\ufe0f\u200d\U0001f308") == "rainbow flag"
    assert caption_for("not an emoji") is None


def test_split_is_fixed_and_about_five_percent():
    assert split_of("red apple") is Split.TRAIN
    assert split_of("play button") is Split.TEST
    assert split_of("woman pilot") is split_of("woman pilot medium-dark skin tone") is Split.TEST
    captions = [caption_for(e) for e in candidates()]
    test_share = sum(split_of(c) is Split.TEST for c in captions) / len(captions)
    assert 0.03 < test_share < 0.07


def test_candidates():
    everything = candidates()
    default_tones = candidates(skin_tones=False)
    assert everything == sorted(everything) and APPLE in everything and THUMBS_MEDIUM in everything
    assert THUMBS_MEDIUM not in default_tones and "\U0001f44d" in default_tones
    assert "\u263a" not in everything  # unqualified form of ☺️ is left out
    assert 3500 < len(everything) and len(default_tones) < len(everything) * 0.6
    assert file_stem(KEYCAP_1) == "31_20e3"


def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(LdmError) as err:
        EmojiRenderer(tmp_path / "NoFont.ttf")
    assert str(err.value) == (
        f"Noto Color Emoji font not found at {tmp_path / 'NoFont.ttf'}; "
        "install it with `apt-get install fonts-noto-color-emoji` or pass --font"
    )


@needs_font
def test_renderer_skips_what_the_font_cannot_draw():
    renderer = EmojiRenderer()
    apple = renderer.render(APPLE, 32)
    assert isinstance(apple, Image.Image) and apple.size == (32, 32) and apple.mode == "RGB"
    assert apple.getpixel((0, 0)) == (255, 255, 255)  # white background
    red, green, blue = apple.getpixel((16, 20))
    assert red > 150 and green < 100 and blue < 100
    assert renderer.render("\U0010fffd", 32) is Skip.BLANK  # private use: no glyph
    assert renderer.render(APPLE + APPLE, 32) is Skip.SEVERAL
    assert renderer.render("\U0001f1f6\U0001f1f6", 32) is Skip.UNKNOWN_FLAG  # "QQ" is no region


@needs_font
def test_build_only_given_emoji(tmp_path):
    only = (APPLE, JAPAN, KEYCAP_1, THUMBS_MEDIUM, "\U0010fffd")
    config = EmojiConfig(out_dir=str(tmp_path / "emoji"), size=32, only=only)
    summary = build_emoji_dataset(config, progress=False)
    assert summary.total == 4
    assert summary.skipped[Skip.NO_NAME] == ["\U0010fffd"]
    rows = [json.loads(line) for line in (tmp_path / "emoji/train/metadata.jsonl").read_text().splitlines()]
    assert (tmp_path / "emoji/test/metadata.jsonl").read_text() == ""
    assert {row["text"]: row["file_name"] for row in rows} == {
        "keycap: 1": "31_20e3.png",
        "thumbs up medium skin tone": "1f44d_1f3fd.png",
        "flag: Japan": "1f1ef_1f1f5.png",
        "red apple": "1f34e.png",
    }
    for row in rows:
        with Image.open(tmp_path / "emoji/train" / row["file_name"]) as image:
            assert (image.size, image.mode) == ((32, 32), "RGB")
    build = json.loads((tmp_path / "emoji/build.json").read_text())
    assert build["written"] == {"train": 4, "test": 0} and build["size"] == 32
    with pytest.raises(LdmError, match="is not empty; pass --overwrite"):
        build_emoji_dataset(config, progress=False)
    smiling = EmojiConfig(out_dir=config.out_dir, size=32, only=(SMILING,))
    assert build_emoji_dataset(smiling, overwrite=True, progress=False).total == 1
    assert sorted(p.name for p in (tmp_path / "emoji/train").iterdir()) == ["263a.png", "metadata.jsonl"]


def run_builder(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "ldm", "emoji", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


@needs_font
def test_cli_limit_is_deterministic_and_loadable(tmp_path):
    metadata = []
    for name in ("a", "b"):
        result = run_builder(str(tmp_path / name), "--size", "24", "--limit", "20")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"emoji dataset {tmp_path / name}: 20 pairs")
        metadata.append([(tmp_path / name / s / "metadata.jsonl").read_text() for s in ("train", "test")])
    assert metadata[0] == metadata[1]
    configs = [DataConfig(path=str(tmp_path / "a" / split), min_side=8) for split in ("train", "test")]
    reports = [scan_dataset(config, progress=False) for config in configs]
    assert [r.layout for r in reports] == [Layout.IMAGEFOLDER] * 2
    assert sum(r.usable for r in reports) == 20 and sum(r.skipped_images for r in reports) == 0
    assert {r.sizes[p.image] for r in reports for p in r.pairs} == {(24, 24)}
    captions = {p.caption for r in reports for p in r.pairs}
    assert {"keycap: #", "keycap: *", "keycap: 0", "keycap: 9"} <= captions
    test_captions = {p.caption for p in reports[1].pairs}
    assert all(split_of(c) is Split.TEST for c in test_captions)


def test_cli_missing_font_exits_2(tmp_path):
    result = run_builder(str(tmp_path / "out"), "--font", str(tmp_path / "none.ttf"))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: Noto Color Emoji font not found at {tmp_path / 'none.ttf'}; "
        "install it with `apt-get install fonts-noto-color-emoji` or pass --font\n"
    )
