"""The emoji dataset (``python -m ldm emoji OUT_DIR --size 64``), rendered from Noto Color Emoji.

Every fully-qualified emoji of the ``emoji`` package is drawn with Pillow from Debian's
``fonts-noto-color-emoji`` (a bitmap font: size 109 is the only one it has), cropped to its ink,
centred on a white square, resized to ``--size`` with LANCZOS and saved as PNG. Decisions:

* Captions are CLDR short names from the ``emoji`` package: ``:red_apple:`` → ``red apple``
  (colons stripped, underscores → spaces). That package drops the CLDR prefix of flags and keycaps,
  so it is put back: 🇯🇵 ``flag: Japan`` (not the bare ``Japan``, which reads like 🗾 map of Japan),
  🏴󠁧󠁢󠁳󠁣󠁴󠁿 ``flag: Scotland``, 1️⃣ ``keycap: 1``. Named flags (🏳️‍🌈 ``rainbow flag``) keep their names.
* Only fully-qualified sequences are used (``☺️``, not the bare ``☺`` that is the same picture);
  emoji with no entry in the ``emoji`` package are skipped.
* Skin-tone variants are kept (``thumbs up medium skin tone``): each is a different picture with its
  own caption, and they are half the data. ``--no-skin-tones`` keeps only the default (yellow) ones.
* Emoji the font cannot draw are skipped and counted by reason: no glyph (renders blank; emoji newer
  than the font), no single glyph (a ZWJ sequence the font draws as several pictures side by side),
  and unknown flag (the font's "?" flag, e.g. 🇨🇶 Sark).
* Split: about 5 % held out in ``test/``, chosen by a hash of the caption with any skin-tone words
  removed, so it is stable across ``emoji`` package versions and all tones of one emoji land in the
  same split (no near-duplicate of a test image is trained on).
* Layout: ``OUT_DIR/train/`` and ``OUT_DIR/test/``, each a Hugging Face imagefolder
  (``metadata.jsonl`` with ``file_name``, ``text`` and the ``emoji`` itself), images named by code
  points (``1f34e.png``; FE0F dropped). ``OUT_DIR/build.json`` records the font, package version,
  counts and the skipped emoji. Point training at ``OUT_DIR/train``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import emoji as emoji_package
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm.errors import LdmError
from ldm.io import write_json, write_text

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only size the bitmap font has
MAX_SIZE = 1024  # output side: the bitmaps are 136 px, so anything larger is upscaling
TEST_PERCENT = 5
FULLY_QUALIFIED = emoji_package.STATUS["fully_qualified"]
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # U+1F3FB..U+1F3FF modifiers
SKIN_TONE_WORDS = re.compile(r"\s*\b(?:medium-light|medium-dark|light|medium|dark) skin tone\b")
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
BLACK_FLAG, CANCEL_TAG = "\U0001f3f4", "\U000e007f"
KEYCAP = "\u20e3"
UNKNOWN_FLAG = "\U0001f1ff\U0001f1ff"  # "ZZ": no such region, drawn as the font's "?" flag


class Split(enum.Enum):
    TRAIN = "train"
    TEST = "test"


class Skip(enum.Enum):
    """Why an emoji is left out. The value is how build.json and the summary name it."""

    NO_NAME = "no name in the emoji package"
    BLANK = "no glyph (renders blank)"
    SEVERAL = "no single glyph (renders as several)"
    UNKNOWN_FLAG = "unknown flag (renders as the '?' flag)"
    DUPLICATE = "caption already used"


@dataclass(frozen=True, kw_only=True)
class EmojiConfig:
    out_dir: str
    size: int = 64  # output side in pixels
    font: str = str(DEFAULT_FONT)
    limit: int | None = None  # stop after this many written pairs (tests)
    only: tuple[str, ...] = ()  # render just these emoji (tests); () = all
    skin_tones: bool = True  # False: keep only the default-tone emoji

    def __post_init__(self):
        if not 1 <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be from 1 to {MAX_SIZE} pixels (the font's bitmaps are about 136 px; "
                             f"larger sizes only upscale), got {self.size}")  # fmt: skip
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")


@dataclass(kw_only=True)
class BuildSummary:
    """What :func:`build_emoji_dataset` wrote and skipped."""

    out_dir: Path
    written: dict[Split, int] = field(default_factory=lambda: {split: 0 for split in Split})
    skipped: dict[Skip, list[str]] = field(default_factory=lambda: {skip: [] for skip in Skip})

    @property
    def total(self) -> int:
        return sum(self.written.values())

    def format(self) -> str:
        rows = [(split.value, n) for split, n in self.written.items()]
        rows += [(f"skipped: {skip.value}", len(names)) for skip, names in self.skipped.items()]
        width = max(len(label) for label, _ in rows) + 2
        lines = [f"  {label:<{width}}{n:>6}" for label, n in rows]
        return "\n".join([f"emoji dataset {self.out_dir}: {self.total} pairs", *lines])


def is_flag(sequence: str) -> bool:
    """A country flag (two regional indicators) or a subdivision flag (black flag + tag letters)."""
    if len(sequence) == 2 and all(ord(c) in REGIONAL_INDICATORS for c in sequence):
        return True
    return sequence.startswith(BLACK_FLAG) and sequence.endswith(CANCEL_TAG)


def caption_for(sequence: str) -> str | None:
    """The CLDR-style caption of ``sequence`` (``🍎`` → ``red apple``), or None if the package lacks it."""
    entry = emoji_package.EMOJI_DATA.get(sequence)
    if entry is None or not entry.get("en"):
        return None
    name = " ".join(entry["en"].strip(":").replace("_", " ").split())
    if is_flag(sequence):
        return f"flag: {name}"
    if KEYCAP in sequence and name.startswith("keycap "):
        return "keycap: " + name.removeprefix("keycap ")
    return name


def split_of(caption: str) -> Split:
    """The fixed split of a caption: about TEST_PERCENT % test, by a hash of its skin-tone-free form."""
    key = SKIN_TONE_WORDS.sub("", caption).strip()
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return Split.TEST if bucket < TEST_PERCENT else Split.TRAIN


def file_stem(sequence: str) -> str:
    """``1f468_200d_1f469`` style name of ``sequence`` (FE0F variation selectors dropped)."""
    return "_".join(f"{ord(c):x}" for c in sequence if c != "\ufe0f")


def candidates(*, skin_tones: bool = True) -> list[str]:
    """Fully-qualified emoji of the ``emoji`` package, sorted by code points."""
    found = [e for e, entry in emoji_package.EMOJI_DATA.items() if entry.get("status") == FULLY_QUALIFIED]
    if not skin_tones:
        found = [e for e in found if not SKIN_TONES.intersection(e)]
    return sorted(found)


class EmojiRenderer:
    """Draws one emoji at a time from a Noto Color Emoji font file, cropped, centred and resized."""

    def __init__(self, font_path: str | Path = DEFAULT_FONT):
        font_path = Path(font_path)
        if not font_path.is_file():
            raise LdmError(
                f"Noto Color Emoji font not found at {font_path}; install it with "
                "`apt-get install fonts-noto-color-emoji` or pass --font"
            )
        try:
            self.font = ImageFont.truetype(str(font_path), FONT_SIZE)
        except OSError as exc:
            raise LdmError(
                f"cannot load {font_path} at size {FONT_SIZE} ({exc}); pass the Noto Color Emoji bitmap font with --font"
            ) from None
        self.font_path = font_path
        self.advance = self.font.getlength("\U0001f34e")  # one glyph's width: 🍎
        self.unknown_flag = self._draw(UNKNOWN_FLAG).tobytes()

    def _draw(self, sequence: str) -> Image.Image:
        """``sequence`` drawn on a transparent canvas with a margin: RGBA, about 136×128 px plus margin."""
        margin = 16
        _, _, _, bottom = self.font.getbbox(sequence)
        width = int(self.font.getlength(sequence)) + 2 * margin
        canvas = Image.new("RGBA", (width, max(bottom, FONT_SIZE) + 2 * margin), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((margin, margin), sequence, font=self.font, embedded_color=True)
        return canvas

    def render(self, sequence: str, size: int) -> Image.Image | Skip:
        """RGB (size, size) image of ``sequence`` on white, or why it cannot be drawn."""
        if self.font.getlength(sequence) > 1.5 * self.advance:
            return Skip.SEVERAL
        canvas = self._draw(sequence)
        if is_flag(sequence) and canvas.tobytes() == self.unknown_flag:
            return Skip.UNKNOWN_FLAG
        box = canvas.getchannel("A").getbbox()
        if box is None or min(box[2] - box[0], box[3] - box[1]) < 4:
            return Skip.BLANK
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def _written_by_us(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".png" or path.name == "metadata.jsonl")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace split folders that hold anything but our own output, or anything without --overwrite."""
    for split in Split:
        folder = out_dir / split.value
        if not folder.exists() or not any(folder.iterdir()):
            continue
        if not overwrite:
            raise LdmError(f"{folder} is not empty; pass --overwrite to replace it, or pick a new OUT_DIR")
        foreign = [p.name for p in folder.iterdir() if not _written_by_us(p)]
        if foreign:
            raise LdmError(f"{folder} holds files this builder did not write ({', '.join(foreign[:3])}); pick a new OUT_DIR")


def build_emoji_dataset(config: EmojiConfig, *, overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """Render the emoji into ``config.out_dir``/{train,test} (imagefolder layout). See the module docstring."""
    out_dir = Path(config.out_dir)
    renderer = EmojiRenderer(config.font)
    _check_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    sequences: Iterable[str] = sorted(set(config.only)) if config.only else candidates(skin_tones=config.skin_tones)
    summary = BuildSummary(out_dir=out_dir)
    rows: dict[Split, list[str]] = {split: [] for split in Split}
    captions: set[str] = set()
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".building-"))
    try:
        for split in Split:
            (staging / split.value).mkdir()
        for sequence in tqdm(sequences, desc="rendering emoji", unit="emoji", disable=not progress):
            if config.limit is not None and summary.total >= config.limit:
                break
            caption = caption_for(sequence)
            if caption is None or caption in captions:
                summary.skipped[Skip.NO_NAME if caption is None else Skip.DUPLICATE].append(sequence)
                continue
            image = renderer.render(sequence, config.size)
            if isinstance(image, Skip):
                summary.skipped[image].append(f"{sequence} {caption}")
                continue
            split = split_of(caption)
            name = f"{file_stem(sequence)}.png"
            image.save(staging / split.value / name)
            rows[split].append(json.dumps({"file_name": name, "text": caption, "emoji": sequence}, ensure_ascii=False))
            captions.add(caption)
            summary.written[split] += 1
        for split in Split:
            write_text(staging / split.value / "metadata.jsonl", "".join(row + "\n" for row in rows[split]))
            target = out_dir / split.value
            if target.exists():
                shutil.rmtree(target)  # checked by _check_out_dir: only our own .png and metadata.jsonl
            (staging / split.value).replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(
        out_dir / "build.json",
        {
            "font": str(renderer.font_path),
            "emoji_package": version("emoji"),
            "size": config.size,
            "skin_tones": config.skin_tones,
            "written": {split.value: n for split, n in summary.written.items()},
            "skipped": {skip.value: names for skip, names in summary.skipped.items()},
        },
    )
    return summary
