"""Find a dataset folder's layout and read its captions, before any image is opened.

Three layouts are understood (see :class:`~ldm.data.config.Layout`):

* ``imagefolder`` — ``metadata.jsonl``, one JSON object per line with ``file_name`` (relative to the
  metadata file, may be in a subfolder) and ``text``;
* ``kohya`` — a ``.txt`` caption beside each image with the same stem (``a/cat.png`` + ``a/cat.txt``);
* ``csv`` — ``metadata.csv`` (or a named csv) with columns ``image`` and ``caption``.

Captions are stripped and their whitespace runs collapsed to single spaces. A missing caption and an
empty one differ: the first makes its image unusable, the second is kept as an unconditional sample.

Nothing outside the folder is ever opened: a caption naming ``../x.png`` or ``/etc/hostname``, or an image or
caption file that is a symlink to somewhere else, is counted as "outside the dataset" before any file is read.
Captions are UTF-8: one that does not decode is counted as undecodable, never repaired with replacement characters.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ldm.data.config import DEFAULT_METADATA, DataConfig, Layout
from ldm.errors import LdmError
from ldm.io import has_undecodable

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
EXPECTED = (
    "expected metadata.jsonl with file_name/text per line (imagefolder), metadata.csv with columns "
    "image/caption (csv), or a .txt caption beside each image (kohya)"
)


@dataclass(frozen=True)
class Pair:
    """One training example as the captions describe it: an image file and its caption ('' = empty)."""

    image: Path
    caption: str


@dataclass(frozen=True, kw_only=True)
class Listing:
    """A folder's captions matched against its image files."""

    root: Path
    layout: Layout
    source: Path | None  # the metadata file; None for kohya
    pairs: tuple[Pair, ...]  # every caption whose image file exists, in file order
    uncaptioned: tuple[Path, ...]  # image files no caption names
    orphans: tuple[str, ...]  # captions naming an image file that does not exist
    bad_rows: tuple[str, ...]  # "metadata.jsonl line 7: not valid JSON"
    outside: tuple[str, ...] = ()  # files named or linked that resolve outside the folder: never opened
    undecodable: tuple[Path, ...] = ()  # images whose caption is not valid UTF-8: unusable

    @property
    def images(self) -> int:
        """Distinct image files: captioned ones and uncaptioned ones."""
        return len({p.image for p in self.pairs}) + len(self.uncaptioned)


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, symlinks followed, lies inside the folder ``root`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop, an unreadable link
        return False


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` (by extension, recursively, sorted), skipping hidden files and folders.

    Symlinked folders are not followed; a symlinked file is yielded as it is (callers check :func:`inside`)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(folder) / name


def _split_outside(root: Path, paths) -> tuple[list[Path], list[str]]:
    """``paths`` that stay inside ``root``, and the others as names relative to it."""
    kept, outside = [], []
    for path in paths:
        if inside(root, path):
            kept.append(path)
        else:
            outside.append(os.path.relpath(path, root))
    return kept, outside


def _read_table_text(table: Path) -> str:
    """A caption table's text; bytes that are not UTF-8 survive as surrogates so their rows can be counted."""
    text = table.read_bytes().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def clean_caption(text: str) -> str:
    return " ".join(text.split())


def _check_root(root: Path) -> None:
    if not root.exists():
        raise LdmError(f"dataset folder {root} not found; check the path")
    if not root.is_dir():
        raise LdmError(f"dataset path {root} is not a folder; pass the folder that holds the images")


def _near_misses(root: Path) -> list[str]:
    """Top-level files that look like a misnamed caption table (``metadata.json1``, ``captions.csv``)."""
    hints = []
    for child in sorted(root.iterdir()):
        if not child.is_file() or child.name in DEFAULT_METADATA.values():
            continue
        close = difflib.get_close_matches(child.name, list(DEFAULT_METADATA.values()), n=1, cutoff=0.8)
        if close:
            hints.append(f"{child.name} (did you mean {close[0]}?)")
        elif child.suffix.lower() in {".csv", ".jsonl", ".json", ".tsv"}:
            hints.append(f"{child.name} (pass --metadata {child.name} if it holds the captions)")
    return hints


def _split_folders(root: Path) -> list[str]:
    jsonl = DEFAULT_METADATA[Layout.IMAGEFOLDER]
    return sorted(child.name for child in root.iterdir() if child.is_dir() and (child / jsonl).is_file())


def detect_layout(root: str | Path, *, metadata: str | None = None, caption_extension: str = ".txt") -> Layout:
    """The layout of the folder ``root``; an :class:`LdmError` names what was found when none fits."""
    root = Path(root)
    _check_root(root)
    if metadata is not None:
        suffix = Path(metadata).suffix.lower()
        if suffix == ".jsonl":
            return Layout.IMAGEFOLDER
        if suffix == ".csv":
            return Layout.CSV
        raise LdmError(
            f"caption table {metadata} must end in .jsonl (imagefolder) or .csv (csv); rename it or pass --layout"
        )
    present = [layout for layout, name in DEFAULT_METADATA.items() if (root / name).is_file()]
    if len(present) > 1:
        names = " and ".join(DEFAULT_METADATA[layout] for layout in present)
        raise LdmError(f"{root} holds both {names}; pass --layout to say which to read")
    if present:
        return present[0]
    images = list(walk_images(root))
    if any(image.with_suffix(caption_extension).is_file() for image in images):
        return Layout.KOHYA
    splits = _split_folders(root)
    if splits:
        raise LdmError(
            f"{root} holds splits ({', '.join(s + '/' for s in splits)}) each with its own metadata.jsonl; "
            f"point at one split, e.g. {root / ('train' if 'train' in splits else splits[0])}"
        )
    found = [f"{len(images)} image(s)", f"no {caption_extension} captions beside them"] + _near_misses(root)
    raise LdmError(f"cannot tell the layout of {root}: found {', '.join(found)}; {EXPECTED}, or pass --layout")


def _table_path(root: Path, config: DataConfig, layout: Layout) -> Path:
    name = config.metadata_name(layout)
    path = root / name
    if not inside(root, path):
        raise LdmError(f"caption table {name} lies outside the dataset folder {root}; put it inside, or copy it there")
    if not path.is_file():
        hints = _near_misses(root)
        found = f" (found {', '.join(hints)})" if hints else ""
        raise LdmError(
            f"{root} has no {name}{found}; the {layout.value} layout expects {name} there, or pass --metadata"
        )
    return path


def _missing_column(table: Path, kind: str, column: str, seen: list[str], flag: str) -> LdmError:
    return LdmError(
        f"{table} has no '{column}' {kind} (found: {', '.join(seen) or 'none'}); rename it or pass {flag}"
    )


def _read_jsonl(table: Path, image_column: str, caption_column: str):
    """Rows ``(name, caption | None)`` and bad-row notes from a metadata.jsonl."""
    rows, bad, seen = [], [], {}
    for number, line in enumerate(_read_table_text(table).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(f"{table.name} line {number}: not valid JSON")
            continue
        if not isinstance(row, dict):
            bad.append(f"{table.name} line {number}: not a JSON object")
            continue
        seen.update(dict.fromkeys(row))
        name = row.get(image_column)
        if not isinstance(name, str) or not name:
            bad.append(f"{table.name} line {number}: no '{image_column}'")
            continue
        if has_undecodable(name):
            bad.append(f"{table.name} line {number}: the '{image_column}' is not valid UTF-8")
            continue
        caption = row.get(caption_column)
        rows.append((name, None if caption is None else str(caption)))
    if seen and image_column not in seen:
        raise _missing_column(table, "field", image_column, list(seen), "--image-column")
    if seen and caption_column not in seen:
        raise _missing_column(table, "field", caption_column, list(seen), "--caption-column")
    return rows, bad


def _read_csv(table: Path, image_column: str, caption_column: str):
    """Rows ``(name, caption | None)`` and bad-row notes from a csv with a header line."""
    rows, bad = [], []
    with io.StringIO(_read_table_text(table), newline="") as f:
        reader = csv.DictReader(f)
        header = [h for h in reader.fieldnames or [] if h is not None]
        for column, flag in ((image_column, "--image-column"), (caption_column, "--caption-column")):
            if column not in header:
                raise _missing_column(table, "column", column, header, flag)
        for row in reader:
            name = (row.get(image_column) or "").strip()
            if not name:
                bad.append(f"{table.name} line {reader.line_num}: no '{image_column}'")
                continue
            if has_undecodable(name):
                bad.append(f"{table.name} line {reader.line_num}: the '{image_column}' is not valid UTF-8")
                continue
            rows.append((name, row.get(caption_column)))
    return rows, bad


def _list_table(root: Path, config: DataConfig, layout: Layout) -> Listing:
    table = _table_path(root, config, layout)
    read = _read_jsonl if layout is Layout.IMAGEFOLDER else _read_csv
    rows, bad = read(table, config.image_column_for(layout), config.caption_column_for(layout))
    pairs, orphans, named, outside, undecodable = [], [], [], [], []
    for name, caption in rows:
        image = Path(os.path.normpath(table.parent / name))
        if not inside(root, image):  # checked before the file is so much as looked at
            outside.append(name)
        elif not image.is_file():
            orphans.append(name)
        elif caption is None:
            named.append(image)  # a row with a null caption: its image counts as uncaptioned
        elif has_undecodable(caption):
            undecodable.append(image)
        else:
            pairs.append(Pair(image, clean_caption(caption)))
    captioned = {pair.image for pair in pairs} | set(undecodable)
    walked, linked_out = _split_outside(root, walk_images(root))
    uncaptioned = dict.fromkeys(p for p in [*walked, *named] if p not in captioned)
    return Listing(
        root=root, layout=layout, source=table, pairs=tuple(pairs), uncaptioned=tuple(uncaptioned),
        orphans=tuple(orphans), bad_rows=tuple(bad), outside=tuple(dict.fromkeys(outside + linked_out)),
        undecodable=tuple(undecodable),
    )  # fmt: skip


def _list_kohya(root: Path, config: DataConfig) -> Listing:
    pairs, uncaptioned, used, undecodable = [], [], set(), []
    images, outside = _split_outside(root, walk_images(root))
    for image in images:
        caption_file = image.with_suffix(config.caption_extension)
        if caption_file.is_file() and not inside(root, caption_file):
            outside.append(os.path.relpath(caption_file, root))  # never read: its image has no caption
            used.add(caption_file)
            uncaptioned.append(image)
        elif caption_file.is_file():
            used.add(caption_file)
            try:
                pairs.append(Pair(image, clean_caption(caption_file.read_bytes().decode("utf-8-sig"))))
            except UnicodeDecodeError:
                undecodable.append(image)
        else:
            uncaptioned.append(image)
    orphans = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix == config.caption_extension and not name.startswith(".") and path not in used:
                orphans.append(str(path.relative_to(root)))
    return Listing(
        root=root, layout=Layout.KOHYA, source=None, pairs=tuple(pairs), uncaptioned=tuple(uncaptioned),
        orphans=tuple(orphans), bad_rows=(), outside=tuple(outside), undecodable=tuple(undecodable),
    )  # fmt: skip


def held_out(config: DataConfig, path: str) -> DataConfig:
    """The config of a held-out folder: ``config``'s size and, where they fit that folder, its layout settings
    (a test split laid out like the training data); where they do not but detection does, detection. No random
    augmentation."""
    inherited = replace(config, path=path, center_crop=True, random_flip=0.0)
    detected = replace(inherited, layout=None, metadata=None, image_column=None, caption_column=None)
    if inherited == detected:
        return inherited
    for candidate in (inherited, detected):
        try:
            list_dataset(candidate)
            return candidate
        except LdmError:
            continue
    return inherited  # neither reads it: the error then names the settings that were given


def list_dataset(config: DataConfig) -> Listing:
    """Read the captions of ``config.path`` in its layout (given, or detected)."""
    root = Path(config.path).expanduser().absolute()
    _check_root(root)
    layout = config.layout or detect_layout(root, metadata=config.metadata, caption_extension=config.caption_extension)
    if layout is Layout.KOHYA:
        return _list_kohya(root, config)
    return _list_table(root, config, layout)
