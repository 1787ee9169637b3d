"""Captioned image datasets: layouts, a scan report of what is wrong, and a torch Dataset.

Training scripts::

    config = DataConfig(path="data/emoji/train", resolution=64, random_flip=0.5)
    report = report_dataset(config)                        # prints the report; LdmError if nothing usable
    dataset = CaptionedImageDataset(config, report=report, seed=seed)

The torch parts (``CaptionedImageDataset``, ``square_tensor``, ``item_seed``) are imported on first use,
so ``python -m ldm data check`` starts without loading torch.
"""

import importlib

from ldm.data.config import DataConfig, Layout
from ldm.data.layouts import IMAGE_EXTENSIONS, Listing, Pair, detect_layout, held_out, list_dataset
from ldm.data.scan import ScanReport, report_dataset, scan_dataset
from ldm.images import ImageInfo, Problem, inspect_image, open_rgb, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionedImageDataset",
    "DataConfig",
    "ImageInfo",
    "Layout",
    "Listing",
    "Pair",
    "Problem",
    "ScanReport",
    "detect_layout",
    "held_out",
    "inspect_image",
    "item_seed",
    "list_dataset",
    "open_rgb",
    "report_dataset",
    "scan_dataset",
    "square_tensor",
    "to_rgb",
]

_LAZY = {name: "ldm.data.dataset" for name in ("CaptionedImageDataset", "item_seed", "square_tensor")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
