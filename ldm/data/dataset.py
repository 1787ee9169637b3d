"""The captioned image folder as a ``torch.utils.data.Dataset`` of square, [-1, 1] tensors.

Randomness (random crop, horizontal flip) comes from a generator seeded by ``(seed, epoch, index)``,
never from global RNG state, so a resumed run sees exactly the same samples. Call
:meth:`CaptionedImageDataset.set_epoch` at the start of each epoch (DataLoader workers pick the new
epoch up when they are started for that epoch, i.e. without ``persistent_workers``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.config import DataConfig
from ldm.data.layouts import Pair
from ldm.data.scan import ScanReport, scan_dataset
from ldm.errors import LdmError
from ldm.images import crop_tensor, decode_rgb, plan_crop


def read_scanned_image(pair: Pair) -> Image.Image:
    """The image of a pair the scan found usable (a file, or a member of a tar shard), as RGB; one that has broken
    since is a clear error, not a traceback."""
    try:
        return decode_rgb(pair.read_bytes())
    except (OSError, SyntaxError, ValueError) as exc:
        raise LdmError(
            f"{pair.image} became unreadable after the scan ({exc}); replace or remove it and start again"
        ) from None


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, independent of every other sample's."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def square_tensor(
    image: Image.Image, *, resolution: int, center_crop: bool = True, flip_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Resize the shorter side to ``resolution``, crop square, maybe flip; (3, resolution, resolution) in [-1, 1].

    Exactly three numbers are drawn from ``generator`` (crop top, crop left, flip) whatever the settings,
    so turning one option off does not shift the others.
    """
    plan = plan_crop(image.size, (resolution, resolution), center_crop=center_crop, flip_p=flip_p, generator=generator)
    return crop_tensor(image, plan)  # (3, R, R) in [-1, 1]


class CaptionedImageDataset(Dataset):
    """Usable pairs of a scanned folder; item ``i`` is ``dict(pixel_values, caption, index)``.

    ``pixel_values``: float32 (3, resolution, resolution) in [-1, 1]; ``caption``: str ('' for an
    empty caption); ``index``: ``i``. Pass the ``report`` of :func:`~ldm.data.scan.report_dataset` to
    avoid scanning twice.
    """

    def __init__(self, config: DataConfig, *, report: ScanReport | None = None, seed: int = 0):
        self.config = config
        self.report = report if report is not None else scan_dataset(config, progress=False)
        if not self.report.pairs:
            raise LdmError(
                f"no usable image/caption pairs in {self.report.root}; run `python -m ldm data check {config.path}`"
            )
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.report.pairs)

    @property
    def captions(self) -> list[str]:
        return [pair.caption for pair in self.report.pairs]

    def image_path(self, index: int) -> Path:
        return self.report.pairs[index].image

    def __getitem__(self, index: int) -> dict:
        pair = self.report.pairs[index]
        image = read_scanned_image(pair)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        pixel_values = square_tensor(
            image, resolution=self.config.resolution, center_crop=self.config.center_crop,
            flip_p=self.config.random_flip, generator=generator,
        )  # fmt: skip
        return {"pixel_values": pixel_values, "caption": pair.caption, "index": index}
