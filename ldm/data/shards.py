"""webdataset shards: ``.tar`` files whose members ``KEY.EXT`` group into samples by key, indexed to be read by offset.

Training reads items by index, in any order, and a tar file is a stream that can only be read front to back — unless
it is not compressed, when each member's bytes lie at a fixed offset in the file. So each shard is indexed once, when
the dataset is listed (its headers only: :mod:`tarfile` seeks past the data), and a member is then read by seeking to
its offset (:meth:`Member.read`). Extracting the shards to a cache folder was the other way; it was not taken because
it doubles the disk a dataset takes and would make ``python -m ldm data check`` write a copy of everything it checks.

Nothing is extracted, so no name inside a tar ever reaches the file system; still, a member named with an absolute
path or a ``..`` part (the tar path traversal), and any member that is not a plain file (links, devices), is refused:
counted as outside the dataset and never read. Compressed shards (``.tar.gz`` content) have no offsets to seek to and
are refused with the fix, as are truncated and empty shards: each is one :class:`~ldm.errors.LdmError` line.

:mod:`ldm.data.shard_writer` writes such shards from any dataset (``python -m ldm data shard``).
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ldm.errors import LdmError

MAX_PATTERN_SHARDS = 100_000  # a brace pattern naming more shards than this is a typo, not a dataset
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and the end-of-archive marker are blocks of this size
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class Member:
    """A plain file inside an uncompressed tar: where its bytes lie."""

    shard: Path
    name: str
    offset: int  # of the member's data, from the start of the shard
    size: int

    def read(self, file: BinaryIO | None = None) -> bytes:
        """The member's bytes, from ``file`` (the shard, already open: many members in a row) or a fresh handle."""
        if file is None:
            with open(self.shard, "rb") as f:
                return self.read(f)
        file.seek(self.offset)
        data = file.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard.name} ends inside {self.name}: the shard was cut short since it was indexed")
        return data


@dataclass(frozen=True, kw_only=True)
class ShardIndex:
    """The plain-file members of one shard, in file order, and the names of those refused."""

    shard: Path
    members: tuple[Member, ...]
    refused: tuple[str, ...]  # "shard.tar:../x.png": absolute, `..`, or not a plain file; never read


def is_shard_pattern(path: str) -> bool:
    return "{" in Path(path).name and Path(path).name.endswith(".tar")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → ``a-000.tar, a-001.tar, a-002.tar``; ``{x,y}`` lists; several braces multiply out."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        low, high = span.groups()
        if int(high) < int(low) or int(high) - int(low) >= MAX_PATTERN_SHARDS:
            raise LdmError(f"shard pattern {pattern} names {{{body}}}; write {{FIRST..LAST}} with FIRST <= LAST")
        choices = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    names = [name for choice in choices for name in expand_braces(head + choice + tail)]
    if len(names) > MAX_PATTERN_SHARDS:
        raise LdmError(f"shard pattern {pattern} names {len(names)} shards, more than {MAX_PATTERN_SHARDS}; check it")
    return names


def pattern_shards(pattern: Path) -> list[Path]:
    """The shards a brace pattern names, each of which must exist."""
    shards = [pattern.parent / name for name in expand_braces(pattern.name)]
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LdmError(f"shard {missing[0]}{more} of the pattern {pattern} not found; check the pattern or the folder")
    return shards


def folder_shards(folder: Path) -> list[Path]:
    """The ``.tar`` files directly in ``folder``, sorted, hidden ones skipped."""
    tars = (p for p in folder.iterdir() if p.suffix.lower() == ".tar" and not p.name.startswith("."))
    return sorted(p for p in tars if p.is_file())


def split_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: ``a/b.seg.png`` → key ``a/b``, extension ``seg.png`` (from the basename's first dot)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _refused(info: tarfile.TarInfo) -> bool:
    path = PurePosixPath(info.name)
    return path.is_absolute() or ".." in path.parts or not info.isreg() or info.issparse()


def _truncated(shard: Path, where: str) -> LdmError:
    return LdmError(f"shard {shard} is truncated ({where}); download or write it again, or move it out of the folder")


def index_shard(shard: Path) -> ShardIndex:
    """Read the headers of ``shard``; an :class:`LdmError` for a shard that is empty, compressed, cut short or not a
    tar at all."""
    size = shard.stat().st_size
    if size == 0:
        raise LdmError(f"shard {shard} is empty (0 bytes); remove it, or write it again")
    with open(shard, "rb") as f:
        head = f.read(8)
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise LdmError(f"shard {shard} is {kind}-compressed; shards are read by offset, which needs a plain tar: "
                           f"decompress it to a .tar (or move it out of the folder)")  # fmt: skip
    members, refused = [], []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if info.isdir():
                    continue
                name = info.name.removeprefix("./")
                if _refused(info):
                    refused.append(f"{shard.name}:{info.name}")
                elif info.offset_data + info.size > size:
                    raise _truncated(shard, f"{name} runs past the end of the file")
                elif not PurePosixPath(name).name.startswith("."):
                    members.append(Member(shard, name, info.offset_data, info.size))
            end = tar.offset  # where the next header would start: the end-of-archive marker must be there
    except tarfile.ReadError as exc:
        if "unexpected end" in str(exc) or "truncated" in str(exc):
            raise _truncated(shard, f"it ends inside a member or header, at byte {size}") from None
        raise LdmError(f"shard {shard} is not a tar file ({exc}); remove it, or replace it") from None
    with open(shard, "rb") as f:
        f.seek(end)
        marker = f.read(BLOCK)
    if marker != bytes(BLOCK):
        raise _truncated(shard, f"no end-of-archive marker after its last member, at byte {end} of {size}")
    if not members and not refused:
        raise LdmError(f"shard {shard} is empty (a tar holding no files); remove it, or write it again")
    return ShardIndex(shard=shard, members=tuple(members), refused=tuple(refused))
