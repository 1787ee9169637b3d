"""Write any dataset's usable pairs as webdataset shards (``python -m ldm data shard``), to be read as
:mod:`ldm.data.shards` reads shards: by offset, from plain tars.

The pairs are those of the scan report, in its order, ``size`` a shard: ``OUT/000000.tar``, ``000001.tar``, ...,
each written atomically. A sample is ``KEY.EXT`` (the image file's bytes as they are, under its own extension) and
``KEY.txt`` (the caption as the folder's layout read it, UTF-8), ``KEY`` its running number (``00000000``, ...), so
that the shards list the same captions and image bytes in the same order as the folder. What the scan skipped is
not written. A kohya image of a repeat folder ``10_x/`` is written as ten samples, as it is ten pairs of the scan:
the shards train as the folder does (the same items, order and epoch length); an image of ``0_x/`` is not written.
(One difference remains there: train_unet.py's feature cache encodes a repeated file once, and the shards' repeats
are samples of their own, so the VAE's batches hold other images; ``--set cache.batch_size=1`` makes the latents
equal by construction; the CPU test found them equal at the default too.) Member owners and times are zero, so the
same pairs give the same bytes.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from tqdm import tqdm

from ldm.data.layouts import Pair
from ldm.data.scan import ScanReport
from ldm.errors import LdmError
from ldm.io import atomic_write

SHARD_NAME = re.compile(r"\d{6}\.tar")  # what write_shards names a shard: 000000.tar, 000001.tar, ...
KEY_DIGITS = 8  # a sample's key: its running number, zero-padded (more digits past 10⁸ samples)


def shard_pattern(shards: list[Path]) -> str:
    """The brace pattern naming ``shards`` as :func:`write_shards` names them: ``out/{000000..000004}.tar``."""
    first, last = shards[0], shards[-1]
    return str(first.parent / (f"{{{first.stem}..{last.stem}}}.tar" if len(shards) > 1 else first.name))


def check_shard_folder(out: Path, *, force: bool = False) -> list[Path]:
    """Refuse an ``out`` that would mix new shards with other files; return the old shards ``force`` may replace.

    A folder that holds anything is refused, but with ``force`` one that holds only shards named as
    :func:`write_shards` names them (and the temp files of a write that was killed): those are replaced. Nothing
    else is ever deleted."""
    if out.exists() and not out.is_dir():
        raise LdmError(f"{out} is an existing file, not a folder; choose a folder path for the shards")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    children = sorted(out.iterdir())
    old = [child for child in children if child.is_file() and SHARD_NAME.fullmatch(child.name)]
    others = [child for child in children if child not in old and not _temp_shard(child)]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        fix = "--force replaces shards only: " if force else ""
        raise LdmError(f"{out} is not empty (it holds {others[0].name}{more}); {fix}choose a new folder for the shards")
    if not force:
        held = f"shards already ({old[0].name}, ...)" if old else "the temp files of a write that was stopped"
        raise LdmError(f"{out} holds {held}; pass --force to replace them, or choose a new folder")
    return old


def _temp_shard(path: Path) -> bool:
    """A temp file that :func:`~ldm.io.atomic_write` left when a shard's write was killed."""
    return path.is_file() and re.fullmatch(r"\.\d{6}\.tar\.[a-z0-9_]{8}\.tmp", path.name) is not None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # owner, group and time fixed (0): the same pairs give the same bytes
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _image_bytes(pair: Pair) -> bytes:
    try:
        return pair.read_bytes()
    except OSError as exc:
        raise LdmError(f"{pair.image} became unreadable after the scan ({exc}); replace or remove it and start "
                       "again") from None  # fmt: skip


def write_shards(report: ScanReport, out: str | Path, size: int, *, force: bool = False,
                 progress: bool = True) -> list[Path]:  # fmt: skip
    """Write the usable pairs of ``report`` to ``out/000000.tar``, ``000001.tar``, ..., ``size`` samples a shard;
    returns the shards in order.

    Plain tars (read by offset), each written atomically. ``out`` must be new or empty; with ``force`` it may hold
    the shards of an earlier write, which are replaced (see :func:`check_shard_folder`)."""
    if size < 1:
        raise LdmError(f"--size is the number of samples a shard holds and must be at least 1, got {size}")
    out = Path(out)
    if any(shard.resolve().parent == out.resolve() for shard in report.shards):
        raise LdmError(f"{out} holds the shards being read; write the new ones to another folder")
    old = check_shard_folder(out, force=force)
    for temp in (child for child in (sorted(out.iterdir()) if out.is_dir() else []) if _temp_shard(child)):
        temp.unlink()
    pairs = report.pairs
    if not pairs:
        raise LdmError(f"no usable image/caption pairs in {report.root} to write; fix the problems its report lists")
    digits = max(KEY_DIGITS, len(str(max(len(pairs) - 1, 0))))
    shards = []
    with tqdm(total=len(pairs), desc="writing shards", unit="sample", disable=not progress, leave=False) as bar:
        for number, start in enumerate(range(0, len(pairs), size)):

            def write(tmp: Path, start=start) -> None:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i, pair in enumerate(pairs[start : start + size], start=start):
                        key = str(i).zfill(digits)
                        _add(tar, f"{key}{pair.image.suffix}", _image_bytes(pair))
                        _add(tar, f"{key}.txt", pair.caption.encode("utf-8"))
                        bar.update()

            shards.append(atomic_write(out / f"{number:06d}.tar", write))
    for stale in set(old) - set(shards):
        stale.unlink()
    return shards
