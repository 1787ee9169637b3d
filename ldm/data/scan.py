"""Scan a dataset folder once: open every captioned image and count what is wrong, as a report.

Skipped (counted, listed with examples, never fatal): images with no caption, zero-size files, files
Pillow cannot read (including text saved as ``.png``), truncated files, images whose shorter side is
below ``min_side``, images whose caption is not valid UTF-8, and files that lie outside the folder (named by a
caption, or symlinked; never opened). Kept but noted: empty captions (trained as unconditional samples), non-RGB modes
(converted to RGB), exact duplicate files (same bytes), images smaller than ``resolution`` (upscaled).

The report also says what was read: the layout, the caption table and its columns, the split (and the others the
folder holds), the webdataset shards, and kohya's repeat folders: ``pairs`` holds each image of ``10_apple/`` ten
times, so that every epoch, batch order and item count sees the repeats.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from ldm.data.config import DataConfig, Layout
from ldm.data.layouts import Pair, list_dataset
from ldm.errors import LdmError
from ldm.images import ImageInfo, Problem, inspect_image

# Shorter-side buckets of the size histogram: (label, lower bound inclusive).
SIZE_BUCKETS = (("<64", 0), ("64-127", 64), ("128-255", 128), ("256-511", 256), ("512-1023", 512), (">=1024", 1024))
EXAMPLES = 3


def _bucket(side: int) -> str:
    return [label for label, low in SIZE_BUCKETS if side >= low][-1]


@dataclass(frozen=True)
class Repeats:
    """A kohya repeat folder: its usable images, each trained ``times`` an epoch."""

    folder: str  # relative to the dataset folder
    images: int
    times: int

    def __str__(self) -> str:
        total = self.images * self.times
        return f"{self.folder}: {_count(self.images, 'image')} × {_count(self.times, 'repeat')} = {total}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True, kw_only=True)
class ScanReport:
    """Everything :func:`scan_dataset` found. ``pairs`` are the usable examples, in file order, an image of a kohya
    repeat folder as many times as the folder says (:attr:`distinct_pairs` holds each once)."""

    root: Path
    layout: Layout
    source: Path | None  # caption table; None for kohya
    min_side: int
    resolution: int
    images: int  # distinct image files, captioned or not
    captions: int  # caption entries read (rows or caption files whose image exists), empty ones included
    pairs: tuple[Pair, ...]  # usable (image, caption) pairs
    missing_captions: tuple[Path, ...]  # images no caption names
    problems: Mapping[Problem, tuple[ImageInfo, ...]]  # skipped captioned images, by reason
    missing_images: tuple[str, ...]  # captions naming a file that does not exist
    bad_rows: tuple[str, ...]  # caption table rows that could not be read
    outside: tuple[str, ...]  # files named or linked that lie outside the folder, never opened
    undecodable: tuple[Path, ...]  # images whose caption is not valid UTF-8
    empty_captions: int  # usable pairs whose caption is ''
    modes: Mapping[str, int]  # usable images stored in a mode other than RGB (converted), by mode
    duplicates: tuple[tuple[Path, ...], ...]  # groups of usable image files with identical bytes
    size_histogram: Mapping[str, int]  # usable images by shorter side, buckets of SIZE_BUCKETS
    upscaled: int  # usable images with a shorter side below `resolution`
    sizes: Mapping[Path, tuple[int, int]] = field(repr=False)  # (width, height) of each usable image
    columns: tuple[str, str] | None = None  # the caption table's (image, caption) columns
    split: str | None = None  # the split subfolder read; None: the folder itself
    splits: tuple[str, ...] = ()  # every split subfolder the folder holds
    repeats: tuple[Repeats, ...] = ()  # kohya repeat folders
    shards: tuple[Path, ...] = ()  # webdataset shards read

    @property
    def usable(self) -> int:
        """Usable examples an epoch, repeats included."""
        return len(self.pairs)

    @property
    def distinct_pairs(self) -> tuple[Pair, ...]:
        """The usable pairs, each once (kohya repeats folded), in file order."""
        return tuple(dict.fromkeys(self.pairs))

    def count(self, problem: Problem) -> int:
        return len(self.problems.get(problem, ()))

    @property
    def skipped_images(self) -> int:
        return len(self.missing_captions) + len(self.undecodable) + sum(len(v) for v in self.problems.values())

    @property
    def duplicate_files(self) -> int:
        """Files that repeat an earlier file's bytes (a group of 3 counts 2)."""
        return sum(len(group) - 1 for group in self.duplicates)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def format(self) -> str:
        """The report as a readable text block."""

        def line(label: str, value: int, note: str = "", indent: int = 2) -> str:
            return f"{' ' * indent}{label:<{28 - indent}}{value:>6}{'   ' + note if note else ''}".rstrip()

        def examples(items) -> str:
            items = list(items)
            more = f", … {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else ""
            return ("e.g. " + ", ".join(items[:EXAMPLES]) + more) if items else ""

        source = f", captions from {self._rel(self.source)}" if self.source else ""
        columns = f", columns {' and '.join(self.columns)}" if self.columns else ""
        sizes = f"min side {self.min_side} px, resolution {self.resolution} px"
        repeated = f"{len(self.distinct_pairs)} distinct, repeats counted; " if self.repeats else ""
        once = self.usable - sum(repeat.images * repeat.times for repeat in self.repeats)
        in_no_folder = [f"    other images: {_count(once, 'image')} × 1 = {once}"] if self.repeats and once else []
        lines = [f"dataset {self.root} (layout {self.layout.value}{source}{columns})"]
        if self.split is not None:
            others = [s for s in self.splits if s != self.split]
            also = f"also here: {', '.join(others)} (--split NAME reads one)" if others else "the only split here"
            lines.append(f"  {'split read':<26}{self.split:>6}   {also}")
        if self.shards:
            lines.append(line("shards", len(self.shards), examples(map(self._rel, self.shards))))
        lines += [
            line("images found", self.images),
            line("caption entries", self.captions),
            line("usable pairs", self.usable, repeated + sizes),
            *(f"    {repeat}" for repeat in self.repeats),
            *in_no_folder,
            line("skipped images", self.skipped_images),
            line("missing caption", len(self.missing_captions), examples(map(self._rel, self.missing_captions)), 4),
            line("caption not UTF-8", len(self.undecodable), examples(map(self._rel, self.undecodable)), 4),
        ]
        for problem in Problem:
            label = f"too small (<{self.min_side} px)" if problem is Problem.TINY else problem.value
            infos = self.problems.get(problem, ())
            notes = (f"{self._rel(i.path)} ({i.detail})" if i.detail else self._rel(i.path) for i in infos)
            lines.append(line(label, len(infos), examples(notes), 4))
        modes = ", ".join(f"{mode} {n}" for mode, n in sorted(self.modes.items()))
        groups = (" = ".join(map(self._rel, group)) for group in self.duplicates)
        empty_note = "kept: trained as unconditional samples" if self.empty_captions else ""
        lines += [
            line("captions without image", len(self.missing_images), examples(self.missing_images)),
            line("outside the dataset", len(self.outside), examples(self.outside) + (" (never opened)" if self.outside else "")),
            line("unreadable caption rows", len(self.bad_rows), examples(self.bad_rows)),
            line("empty captions", self.empty_captions, empty_note),
            line("converted to RGB", sum(self.modes.values()), modes),
            line("exact duplicates", self.duplicate_files, examples(groups)),
            line(f"upscaled (<{self.resolution} px)", self.upscaled),
            "  shorter side " + " | ".join(f"{label}: {n}" for label, n in self.size_histogram.items()),
        ]
        return "\n".join(lines)

    __str__ = format


@dataclass(frozen=True)
class ScanShare:
    """One process's part of a scan that several processes share: process ``rank`` of ``processes`` decodes every
    ``processes``-th image, and ``gather`` (a collective: every process's object, in rank order, on every process)
    brings the parts together, so that every process holds the whole report for the decoding of its share."""

    rank: int
    processes: int
    gather: Callable[[object], list]


def scan_dataset(
    config: DataConfig, *, workers: int | None = None, progress: bool = True, share: ScanShare | None = None
) -> ScanReport:
    """List ``config.path``'s captions, fully decode each captioned image once, and report.

    Raises :class:`LdmError` only for a folder problem (missing, unknown layout, unreadable caption
    table); a bad image or caption is counted in the report. With ``share``, the decoding is split among the
    processes of a run (each lists the folder, which reads no image).
    """
    listing = list_dataset(config)
    unique = list({pair.image: pair for pair in listing.pairs}.values())  # one pair per image file
    workers = workers or min(8, os.cpu_count() or 1)
    rank, processes = (share.rank, share.processes) if share is not None else (0, 1)

    def inspect(pair: Pair) -> ImageInfo:
        return inspect_image(pair.image, min_side=config.min_side, read=pair.read_bytes)

    mine = unique[rank::processes]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
        infos = list(
            tqdm(
                pool.map(inspect, mine),
                total=len(mine), desc="scanning images", unit="img", disable=not progress, leave=False,
            )
        )  # fmt: skip
    if processes > 1:
        parts = share.gather(infos)
        infos = [parts[i % processes][i // processes] for i in range(len(unique))]  # back in listing order
    by_path = {info.path: info for info in infos}
    problems: dict[Problem, list[ImageInfo]] = defaultdict(list)
    for info in infos:
        if info.problem is not None:
            problems[info.problem].append(info)
    good = [info for info in infos if info.problem is None]
    distinct = [pair for pair in listing.pairs if by_path[pair.image].problem is None]
    pairs = tuple(pair for pair in distinct for _ in range(listing.repeats_of(pair.image)))
    in_folder = Counter(listing.repeat_folder(image) for image in dict.fromkeys(pair.image for pair in distinct))
    repeats = tuple(Repeats(os.path.relpath(folder, listing.root), in_folder[folder], times)
                    for folder, times in listing.repeats.items())  # fmt: skip
    by_digest: dict[str, list[Path]] = defaultdict(list)
    for info in good:
        by_digest[info.digest].append(info.path)
    histogram = {label: 0 for label, _ in SIZE_BUCKETS}
    histogram.update(Counter(_bucket(info.min_side) for info in good))
    return ScanReport(
        root=listing.root,
        layout=listing.layout,
        source=listing.source,
        min_side=config.min_side,
        resolution=config.resolution,
        images=listing.images,
        captions=len(listing.pairs),
        pairs=pairs,
        missing_captions=listing.uncaptioned,
        problems={problem: tuple(problems[problem]) for problem in Problem if problems[problem]},
        missing_images=listing.orphans,
        bad_rows=listing.bad_rows,
        outside=listing.outside,
        undecodable=listing.undecodable,
        empty_captions=sum(1 for pair in distinct if not pair.caption),
        modes=dict(sorted(Counter(info.mode for info in good if info.mode != "RGB").items())),
        duplicates=tuple(tuple(group) for group in by_digest.values() if len(group) > 1),
        size_histogram=histogram,
        upscaled=sum(1 for info in good if info.min_side < config.resolution),
        sizes={info.path: info.size for info in good},
        columns=listing.columns,
        split=listing.split,
        splits=listing.splits,
        repeats=repeats,
        shards=listing.shards,
    )


def report_dataset(
    config: DataConfig, *, file: TextIO | None = None, workers: int | None = None, progress: bool = True,
    quiet: bool = False, share: ScanShare | None = None,
) -> ScanReport:  # fmt: skip
    """Scan, print the report to ``file`` (stdout), and return it; :class:`LdmError` if nothing is usable.

    Training scripts call this at start, so the same report as ``python -m ldm data check`` is in the log; their
    processes other than the main one pass ``quiet`` (no report, no progress bar), and all of them a ``share``.
    """
    report = scan_dataset(config, workers=workers, progress=progress and not quiet, share=share)
    if not quiet:
        print(report.format(), file=file or sys.stdout, flush=True)
    if not report.pairs:
        raise LdmError(f"no usable image/caption pairs in {report.root}; fix the problems listed in the report above")
    return report
