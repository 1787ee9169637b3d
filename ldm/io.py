"""Files written atomically (temp file + rename), hashed, and safetensors without pickle."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and a run killed mid-write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names a temp file


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files that writes killed midway left under ``folder`` (recursively); returns them.

    Only for a folder that no process is writing to now: a run's own output folder as the run starts again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [path for path in sorted(folder.rglob(".*.tmp")) if path.is_file() and TEMP_NAME.match(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def has_undecodable(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8: decoded with ``surrogateescape`` (as Python decodes argv,
    and as the dataset reader decodes caption tables), each such byte is a lone surrogate U+DC80..U+DCFF."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    from safetensors.torch import save_file  # torch loads here, not for the file helpers above

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def weights_sha256(module) -> str:
    """The sha256 of a torch module's parameters and buffers, by name, dtype and shape, as they are in memory (a
    merged LoRA included): for weights that were never saved as a file, or changed since."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
