"""The typed config of a captioned image folder: where it is, how it is laid out, how images are shaped."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Layout(enum.Enum):
    """How captions are attached to images in a dataset folder."""

    IMAGEFOLDER = "imagefolder"  # metadata.jsonl: one {"file_name": ..., "text": ...} per line (Hugging Face)
    KOHYA = "kohya"  # a caption file beside each image, same stem: cat.png + cat.txt; N_name/ folders repeat N times
    CSV = "csv"  # metadata.csv with columns image, caption (or Hugging Face's file_name, text)
    WEBDATASET = "webdataset"  # .tar shards of KEY.jpg + KEY.txt (or KEY.json with a caption or text key)
    IMAGES = "images"  # image files alone, each captioned DataConfig.caption (DreamBooth's subject and class folders)


DEFAULT_METADATA = {Layout.IMAGEFOLDER: "metadata.jsonl", Layout.CSV: "metadata.csv"}
# The columns read when none is named, the first one a table has: ours, and Hugging Face imagefolder's.
DEFAULT_IMAGE_COLUMNS = {Layout.IMAGEFOLDER: ("file_name", "image"), Layout.CSV: ("image", "file_name")}
DEFAULT_CAPTION_COLUMNS = {Layout.IMAGEFOLDER: ("text", "caption"), Layout.CSV: ("caption", "text")}
# Split subfolders (Hugging Face's names): a folder holding any of these is read one split at a time, train/ unless
# told otherwise; the held-out set is the first of HELD_OUT_SPLITS it holds, when no eval folder is given.
SPLITS = ("train", "validation", "test")
HELD_OUT_SPLITS = ("test", "validation")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """A captioned image folder and the transforms that turn its images into training tensors.

    Empty captions are kept (and counted in the scan report): they act as unconditional samples,
    the same role caption dropout plays for classifier-free guidance.
    """

    path: str  # a folder; for webdataset also one .tar shard or a brace pattern (shards-{000..009}.tar)
    split: str | None = None  # a split subfolder of `path` (train/, test/, ...); None: train/ where there are splits
    layout: Layout | None = None  # None: detect from the folder's contents
    metadata: str | None = None  # caption table inside `path`; None: metadata.jsonl / metadata.csv
    image_column: str | None = None  # None: file_name (imagefolder) / image (csv), else the other one
    caption_column: str | None = None  # None: text (imagefolder) / caption (csv), else the other one
    caption_extension: str = ".txt"  # kohya caption files, and the text member of a webdataset sample
    resolution: int = 512  # output side in pixels: shorter side resized to this, then cropped square
    center_crop: bool = True  # False: random crop (deterministic per seed, epoch, index)
    random_flip: float = 0.0  # probability of a horizontal flip
    min_side: int = 32  # images with a shorter side below this are skipped as too small
    caption: str = ""  # layout images: the caption of every image ("" = unconditional samples)

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if not 0.0 <= self.random_flip <= 1.0:
            raise ValueError(f"random_flip is a probability in [0, 1], got {self.random_flip}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be at least 1, got {self.min_side}")
        if self.split is not None and (not self.split or self.split in {".", ".."} or "/" in self.split):
            raise ValueError(f"split names a subfolder of the dataset folder (train, test, ...), got {self.split!r}")
        if self.caption and self.layout is not Layout.IMAGES:
            raise ValueError("caption is the caption of every image of the images layout; set layout: images with it "
                             "(or leave caption out to read the folder's own captions)")  # fmt: skip
        if not self.caption_extension.startswith("."):
            raise ValueError(f"caption_extension must start with '.', got {self.caption_extension!r}")

    def metadata_name(self, layout: Layout) -> str | None:
        return self.metadata or DEFAULT_METADATA.get(layout)

    def image_columns_for(self, layout: Layout) -> tuple[str, ...]:
        """The image column given, or the defaults in the order they are looked for."""
        return (self.image_column,) if self.image_column else DEFAULT_IMAGE_COLUMNS[layout]

    def caption_columns_for(self, layout: Layout) -> tuple[str, ...]:
        return (self.caption_column,) if self.caption_column else DEFAULT_CAPTION_COLUMNS[layout]


# The layout flags, shared by ``python -m ldm data check``, the training scripts and ``python -m ldm eval``,
# so that an error message's "pass --layout" holds wherever it is raised.
LAYOUT_FLAGS = {  # flag → DataConfig field
    "--split": "split",
    "--layout": "layout",
    "--metadata": "metadata",
    "--image-column": "image_column",
    "--caption-column": "caption_column",
    "--caption-extension": "caption_extension",
}
