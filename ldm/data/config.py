"""The typed config of a captioned image folder: where it is, how it is laid out, how images are shaped."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Layout(enum.Enum):
    """How captions are attached to images in a dataset folder."""

    IMAGEFOLDER = "imagefolder"  # metadata.jsonl: one {"file_name": ..., "text": ...} per line (Hugging Face)
    KOHYA = "kohya"  # a caption file beside each image, same stem: cat.png + cat.txt
    CSV = "csv"  # metadata.csv with columns image, caption


DEFAULT_METADATA = {Layout.IMAGEFOLDER: "metadata.jsonl", Layout.CSV: "metadata.csv"}
DEFAULT_IMAGE_COLUMN = {Layout.IMAGEFOLDER: "file_name", Layout.CSV: "image"}
DEFAULT_CAPTION_COLUMN = {Layout.IMAGEFOLDER: "text", Layout.CSV: "caption"}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """A captioned image folder and the transforms that turn its images into training tensors.

    Empty captions are kept (and counted in the scan report): they act as unconditional samples,
    the same role caption dropout plays for classifier-free guidance.
    """

    path: str
    layout: Layout | None = None  # None: detect from the folder's contents
    metadata: str | None = None  # caption table inside `path`; None: metadata.jsonl / metadata.csv
    image_column: str | None = None  # None: file_name (imagefolder) / image (csv)
    caption_column: str | None = None  # None: text (imagefolder) / caption (csv)
    caption_extension: str = ".txt"  # kohya caption files
    resolution: int = 512  # output side in pixels: shorter side resized to this, then cropped square
    center_crop: bool = True  # False: random crop (deterministic per seed, epoch, index)
    random_flip: float = 0.0  # probability of a horizontal flip
    min_side: int = 32  # images with a shorter side below this are skipped as too small

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if not 0.0 <= self.random_flip <= 1.0:
            raise ValueError(f"random_flip is a probability in [0, 1], got {self.random_flip}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be at least 1, got {self.min_side}")
        if not self.caption_extension.startswith("."):
            raise ValueError(f"caption_extension must start with '.', got {self.caption_extension!r}")

    def metadata_name(self, layout: Layout) -> str | None:
        return self.metadata or DEFAULT_METADATA.get(layout)

    def image_column_for(self, layout: Layout) -> str:
        return self.image_column or DEFAULT_IMAGE_COLUMN[layout]

    def caption_column_for(self, layout: Layout) -> str:
        return self.caption_column or DEFAULT_CAPTION_COLUMN[layout]


# The layout flags, shared by ``python -m ldm data check``, the training scripts and ``python -m ldm eval``,
# so that an error message's "pass --layout" holds wherever it is raised.
LAYOUT_FLAGS = {  # flag → DataConfig field
    "--layout": "layout",
    "--metadata": "metadata",
    "--image-column": "image_column",
    "--caption-column": "caption_column",
    "--caption-extension": "caption_extension",
}
