"""Find a dataset folder's layout and read its captions, before any image is opened.

Four layouts are understood (see :class:`~ldm.data.config.Layout`):

* ``imagefolder`` — ``metadata.jsonl``, one JSON object per line with ``file_name`` (relative to the
  metadata file, may be in a subfolder) and ``text``;
* ``csv`` — ``metadata.csv`` (or a named csv) with columns ``image`` and ``caption``, or Hugging Face
  imagefolder's ``file_name`` and ``text`` (whichever a table has; ``--image-column``/``--caption-column`` name others);
* ``kohya`` — a ``.txt`` caption beside each image with the same stem (``a/cat.png`` + ``a/cat.txt``); images in a
  top-level folder ``N_name/`` (kohya's repeat folders, ``10_apple/``) are trained N times an epoch;
* ``webdataset`` — ``.tar`` shards of ``KEY.jpg`` (``.png``, ``.webp``, ...) with ``KEY.txt``, or ``KEY.json``
  holding ``caption`` or ``text``; a folder of shards, one shard, or a brace pattern (see :mod:`ldm.data.shards`);
* ``images`` — the image files alone, each captioned ``DataConfig.caption`` (any caption files are not read): the
  pictures of one subject or one class, as DreamBooth trains on. Never detected: it is asked for.

A folder holding split subfolders (``train/``, ``validation/``, ``test/``, each laid out as above; Hugging Face's
convention) and nothing of its own is read one split at a time: ``train/`` unless ``split`` names another.

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
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm.data.config import DEFAULT_METADATA, HELD_OUT_SPLITS, SPLITS, DataConfig, Layout
from ldm.data.shards import Member, folder_shards, index_shard, is_shard_pattern, pattern_shards, split_key
from ldm.errors import LdmError
from ldm.io import has_undecodable

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
EXPECTED = (
    "expected metadata.jsonl with file_name/text per line (imagefolder), metadata.csv with columns "
    "image/caption or file_name/text (csv), a .txt caption beside each image (kohya), .tar shards (webdataset), "
    "or split folders train/, test/"
)
REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")  # kohya: 10_apple/ holds images trained 10 times an epoch


@dataclass(frozen=True)
class Pair:
    """One training example as the captions describe it: an image file and its caption ('' = empty).

    An image inside a webdataset shard has a ``member`` saying where its bytes lie; its ``image`` is then the shard's
    path joined with the member's name (``/data/000.tar/cat.jpg``): a name for reports and keys, not a file."""

    image: Path
    caption: str
    member: Member | None = None

    @property
    def file(self) -> Path:
        """The file on disk that holds the image's bytes: the image file, or its shard."""
        return self.member.shard if self.member is not None else self.image

    def read_bytes(self) -> bytes:
        return self.member.read() if self.member is not None else self.image.read_bytes()


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
    columns: tuple[str, str] | None = None  # the caption table's (image, caption) columns
    split: str | None = None  # the split subfolder read; None: the folder itself
    splits: tuple[str, ...] = ()  # the split subfolders the folder holds
    repeats: Mapping[Path, int] = field(default_factory=dict)  # kohya repeat folder → times an epoch
    shards: tuple[Path, ...] = ()  # webdataset shards read

    @property
    def images(self) -> int:
        """Distinct image files: captioned ones and uncaptioned ones."""
        return len({p.image for p in self.pairs}) + len(self.uncaptioned)

    def repeat_folder(self, image: Path) -> Path | None:
        """The kohya repeat folder ``image`` lies in, if any."""
        return next((folder for folder in self.repeats if folder in image.parents), None)

    def repeats_of(self, image: Path) -> int:
        """How many times an epoch ``image`` is trained: its repeat folder's N, else once."""
        folder = self.repeat_folder(image)
        return 1 if folder is None else self.repeats[folder]


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


def _folders_with_tables(root: Path) -> list[str]:
    """Subfolders holding a caption table of their own (splits under names other than train/test/validation)."""
    names = DEFAULT_METADATA.values()
    return sorted(c.name for c in root.iterdir() if c.is_dir() and any((c / name).is_file() for name in names))


def split_folders(root: Path) -> tuple[str, ...]:
    """The split subfolders (``train/``, ``validation/``, ``test/``) of ``root``, in that order."""
    return tuple(name for name in SPLITS if (root / name).is_dir())


def _reads_as_one(root: Path, config: DataConfig) -> bool:
    """Whether ``root`` is a dataset of its own: a caption table, shards or images directly in it."""
    if config.metadata is not None or any((root / name).is_file() for name in DEFAULT_METADATA.values()):
        return True
    extensions = IMAGE_EXTENSIONS | {".tar"}
    return any(c.suffix.lower() in extensions and not c.name.startswith(".") for c in root.iterdir() if c.is_file())


def resolve_split(root: Path, config: DataConfig) -> tuple[Path, str | None, tuple[str, ...]]:
    """(folder to read, split read, splits ``root`` holds): ``config.split``, else train/ where ``root`` is a folder
    of splits, else ``root`` itself."""
    splits = split_folders(root)
    if config.split is not None:
        folder = root / config.split
        if not folder.is_dir() or not inside(root, folder):
            have = (f"it has {', '.join(s + '/' for s in splits)}; pass one of those" if splits else
                    "it has no split folders (train/, validation/, test/); leave out --split")  # fmt: skip
            raise LdmError(f"split '{config.split}' not found in {root}; {have}")
        return folder, config.split, splits
    if not splits or _reads_as_one(root, config):
        return root, None, ()
    if SPLITS[0] not in splits:
        raise LdmError(
            f"{root} holds splits {', '.join(s + '/' for s in splits)} but no {SPLITS[0]}/; pass --split NAME to say "
            "which to read"
        )
    return root / SPLITS[0], SPLITS[0], splits


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
    kohya = any(image.with_suffix(caption_extension).is_file() for image in images)
    if folder_shards(root):
        if kohya:
            raise LdmError(f"{root} holds both .tar shards and captioned images; pass --layout to say which to read")
        return Layout.WEBDATASET
    if kohya:
        return Layout.KOHYA
    splits = _folders_with_tables(root)
    if splits:
        raise LdmError(
            f"{root} holds folders each with its own caption table ({', '.join(s + '/' for s in splits)}); pass "
            f"--split NAME to read one, e.g. --split {splits[0]}"
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


def _pick_column(table: Path, kind: str, candidates: tuple[str, ...], seen: list[str], flag: str) -> str:
    """The first of ``candidates`` the table has; else an error listing the ones it has."""
    for column in candidates:
        if column in seen:
            return column
    wanted = f"neither {' nor '.join(repr(c) for c in candidates)}" if len(candidates) > 1 else f"no {candidates[0]!r}"
    found = ", ".join(seen) or "none"
    fix = "rename one" if len(candidates) > 1 else "rename it"
    raise LdmError(f"{table} has {wanted} {kind} (found: {found}); {fix} or pass {flag}")


def _pick_columns(table: Path, kind: str, config: DataConfig, layout: Layout, seen: list[str]) -> tuple[str, str]:
    image = _pick_column(table, kind, config.image_columns_for(layout), seen, "--image-column")
    caption = _pick_column(table, kind, config.caption_columns_for(layout), seen, "--caption-column")
    return image, caption


def _read_jsonl(table: Path, config: DataConfig):
    """Rows ``(name, caption | None)``, bad-row notes and the columns read, from a metadata.jsonl."""
    lines, seen = [], {}
    for number, line in enumerate(_read_table_text(table).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = "not valid JSON"
        if not isinstance(row, dict):
            row = row if isinstance(row, str) else "not a JSON object"
        else:
            seen.update(dict.fromkeys(row))
        lines.append((number, row))
    if not seen:
        return [], [f"{table.name} line {number}: {row}" for number, row in lines], None
    image_column, caption_column = _pick_columns(table, "field", config, Layout.IMAGEFOLDER, list(seen))
    rows, bad = [], []
    for number, row in lines:
        if isinstance(row, str):
            bad.append(f"{table.name} line {number}: {row}")
            continue
        name = row.get(image_column)
        if not isinstance(name, str) or not name:
            bad.append(f"{table.name} line {number}: no '{image_column}'")
            continue
        if has_undecodable(name):
            bad.append(f"{table.name} line {number}: the '{image_column}' is not valid UTF-8")
            continue
        caption = row.get(caption_column)
        rows.append((name, None if caption is None else str(caption)))
    return rows, bad, (image_column, caption_column)


def _read_csv(table: Path, config: DataConfig):
    """Rows ``(name, caption | None)``, bad-row notes and the columns read, from a csv with a header line."""
    rows, bad = [], []
    with io.StringIO(_read_table_text(table), newline="") as f:
        reader = csv.DictReader(f)
        header = [h for h in reader.fieldnames or [] if h is not None]
        image_column, caption_column = _pick_columns(table, "column", config, Layout.CSV, header)
        for row in reader:
            name = (row.get(image_column) or "").strip()
            if not name:
                bad.append(f"{table.name} line {reader.line_num}: no '{image_column}'")
                continue
            if has_undecodable(name):
                bad.append(f"{table.name} line {reader.line_num}: the '{image_column}' is not valid UTF-8")
                continue
            rows.append((name, row.get(caption_column)))
    return rows, bad, (image_column, caption_column)


def _list_table(root: Path, config: DataConfig, layout: Layout) -> Listing:
    table = _table_path(root, config, layout)
    read = _read_jsonl if layout is Layout.IMAGEFOLDER else _read_csv
    rows, bad, columns = read(table, config)
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
        undecodable=tuple(undecodable), columns=columns,
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
        repeats=repeat_folders(root),
    )  # fmt: skip


def _list_images(root: Path, config: DataConfig) -> Listing:
    """Every image file under ``root`` (recursively, sorted), each with ``config.caption``."""
    images, outside = _split_outside(root, walk_images(root))
    caption = clean_caption(config.caption)
    return Listing(
        root=root, layout=Layout.IMAGES, source=None, pairs=tuple(Pair(image, caption) for image in images),
        uncaptioned=(), orphans=(), bad_rows=(), outside=tuple(outside),
    )  # fmt: skip


def repeat_folders(root: Path) -> dict[Path, int]:
    """kohya's repeat folders directly in ``root``: ``10_apple/`` → 10 (as in kohya, ``0_x/`` trains its images
    0 times)."""
    folders = sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith("."))
    return {folder: int(match[1]) for folder in folders if (match := REPEAT_FOLDER.fullmatch(folder.name))}


def _sample_caption(
    files: dict[str, Member], *, text: str, key: str, json_key: str | None, read: Callable[[Member], bytes]
) -> tuple[str | None, bool, str | None]:
    """The caption of one webdataset sample: (caption | None, undecodable, bad-row note | None). ``KEY.txt`` (the
    caption extension) wins over ``KEY.json``, whose ``caption`` or ``text`` (or ``json_key``) is read."""
    if text in files:
        try:
            return read(files[text]).decode("utf-8-sig"), False, None
        except UnicodeDecodeError:
            return None, True, None
    if "json" not in files:
        return None, False, None
    where = f"{files['json'].shard.name}:{key}.json"
    try:
        row = json.loads(read(files["json"]).decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, True, None
    except json.JSONDecodeError:
        return None, False, f"{where}: not valid JSON"
    if not isinstance(row, dict):
        return None, False, f"{where}: not a JSON object"
    names = (json_key,) if json_key else ("caption", "text")
    name = next((n for n in names if n in row), None)
    if name is None:
        return None, False, f"{where}: no {' or '.join(repr(n) for n in names)} (found: {', '.join(row) or 'none'})"
    return (None if row[name] is None else str(row[name])), False, None


def _list_webdataset(root: Path, config: DataConfig, shards: list[Path] | None = None) -> Listing:
    """The samples of ``shards`` (default: the .tar files in ``root``), each shard indexed once (see
    :mod:`ldm.data.shards`); shards linked from outside ``root`` are not opened."""
    outside: list[str] = []
    if shards is None:
        shards, outside = _split_outside(root, folder_shards(root))
    if not shards:
        raise LdmError(f"{root} holds no .tar shards; {EXPECTED}, or pass --layout")
    text = config.caption_extension[1:].lower()
    pairs, uncaptioned, orphans, bad, undecodable = [], [], [], [], []
    for shard in shards:
        index = index_shard(shard)
        outside += index.refused
        samples: dict[str, dict[str, Member]] = {}
        for member in index.members:
            key, ext = split_key(member.name)
            samples.setdefault(key, {}).setdefault(ext, member)
        with open(shard, "rb") as f:
            for key, files in samples.items():
                caption, bad_text, note = _sample_caption(files, text=text, key=key, json_key=config.caption_column,
                                                          read=lambda member: member.read(f))  # fmt: skip
                images = [m for ext, m in files.items() if f".{ext}" in IMAGE_EXTENSIONS]
                if note is not None:
                    bad.append(note)
                if not images and (caption is not None or bad_text):
                    orphans.append(f"{shard.name}:{key}.{text if text in files else 'json'}")
                for member in images:
                    image = shard / member.name
                    if bad_text:
                        undecodable.append(image)
                    elif caption is None:
                        uncaptioned.append(image)
                    else:
                        pairs.append(Pair(image, clean_caption(caption), member))
    return Listing(
        root=root, layout=Layout.WEBDATASET, source=None, pairs=tuple(pairs), uncaptioned=tuple(uncaptioned),
        orphans=tuple(orphans), bad_rows=tuple(bad), outside=tuple(outside), undecodable=tuple(undecodable),
        shards=tuple(shards),
    )  # fmt: skip


def held_out(config: DataConfig, path: str | None = None) -> DataConfig | None:
    """The config of the held-out images, without random augmentation.

    With a folder ``path``: that folder, with ``config``'s size and, where they fit that folder, its layout settings
    (a test split laid out like the training data); where they do not but detection does, detection. A folder of
    splits gives its test/ (else validation/) split. Without one: the test/ (else validation/) split of ``config``'s
    own folder, when it is a folder of splits and that is not the split trained on; None when there is none.
    """
    if not path:
        split = _held_out_split(config)
        return None if split is None else replace(config, split=split, center_crop=True, random_flip=0.0)
    split = _held_out_split(replace(config, path=path, split=None), explicit=True)
    inherited = replace(config, path=path, split=split, center_crop=True, random_flip=0.0)
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


def _held_out_split(config: DataConfig, *, explicit: bool = False) -> str | None:
    """The split to hold out of ``config.path``: test/ or validation/, the first it holds that is not trained on
    (train/, or ``config.split``). ``explicit`` (a folder given as the held-out one): a folder of splits with neither
    gives "test", so that the error names the splits it does have."""
    root = Path(config.path).expanduser().absolute()
    if is_shard_pattern(config.path) or not root.is_dir() or (config.split is None and _reads_as_one(root, config)):
        return None
    splits = split_folders(root)
    if not splits:
        return None
    trained = None if explicit else (config.split or SPLITS[0])
    chosen = next((split for split in HELD_OUT_SPLITS if split in splits and split != trained), None)
    return chosen or ("test" if explicit else None)


def _list_shards(path: Path, config: DataConfig) -> Listing:
    """A webdataset given as one shard or a brace pattern, rather than a folder."""
    if config.split is not None:
        raise LdmError(f"--split {config.split} names a subfolder, and {path} is a shard, not a folder; leave it out")
    if config.layout not in (None, Layout.WEBDATASET):
        raise LdmError(f"{path} is a .tar shard, read in the webdataset layout; drop --layout {config.layout.value}")
    _check_root(path.parent)
    shards = pattern_shards(path) if is_shard_pattern(str(path)) else [path]
    return _list_webdataset(path.parent, config, shards)


def list_dataset(config: DataConfig) -> Listing:
    """Read the captions of ``config.path`` (its split, where it is a folder of splits) in its layout (given, or
    detected); kohya repeat folders are listed once, :meth:`Listing.repeats_of` says how often each image trains."""
    root = Path(config.path).expanduser().absolute()
    if is_shard_pattern(config.path) or (root.suffix.lower() == ".tar" and root.is_file()):
        return _list_shards(root, config)
    _check_root(root)
    folder, split, splits = resolve_split(root, config)
    layout = config.layout or detect_layout(
        folder, metadata=config.metadata, caption_extension=config.caption_extension
    )
    if layout is Layout.KOHYA:
        listing = _list_kohya(folder, config)
    elif layout is Layout.WEBDATASET:
        listing = _list_webdataset(folder, config)
    elif layout is Layout.IMAGES:
        listing = _list_images(folder, config)
    else:
        listing = _list_table(folder, config, layout)
    return replace(listing, root=root, split=split, splits=splits)
