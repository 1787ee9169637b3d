"""generate.py's LoRAs: ``--lora FILE[:SCALE]`` (repeatable), ``--lora-scale``, and A1111's ``<lora:NAME:WEIGHT>``
prompt tags, looked up in ``--lora-dir`` (default ``models/lora/`` where it exists) and cut from the prompt's text
before it is encoded. All of a run's LoRAs are merged into the model once, so every prompt of a run must ask for the
same ones."""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import LdmError
from ldm.formats.pngmeta import ImageParameters, LoraRecord

DEFAULT_LORA_DIR = Path("models/lora")
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # <lora:name>, <lora:name:0.8>, <lora:n:0.8:0.5>


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA to merge: its file and its scale."""

    path: Path
    scale: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA file (diffusers or kohya format; train_unet.py --lora-rank writes both) merged into the "
                        "model at SCALE (default --lora-scale); repeat for several")  # fmt: skip
    p.add_argument("--lora-scale", type=float, default=None,
                   help="strength of each --lora given without its own (default 1; 0 = the base model)")
    p.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help=f"where <lora:NAME:WEIGHT> in a prompt finds NAME.safetensors (default {DEFAULT_LORA_DIR}/)")


def strip_lora_tags(prompt: str) -> str:
    """The prompt without its ``<lora:…>`` tags: the text that is encoded."""
    return " ".join(LORA_TAG.sub(" ", prompt).split()) if LORA_TAG.search(prompt) else prompt


def prompt_tags(prompt: str) -> tuple[tuple[str, float], ...]:
    """The ``<lora:NAME:WEIGHT>`` tags of a prompt as (name, weight); a tag without a weight has weight 1."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            value = float(weight) if weight not in (None, "") else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise LdmError(f"{match.group(0)} in the prompt: the weight must be a number, as in <lora:{name}:0.8>")
        tags.append((name, value))
    return tuple(tags)


def parse_flag(text: str) -> tuple[Path, float | None]:
    """``FILE`` or ``FILE:SCALE`` (a file name that itself ends in ``:number`` needs the scale given after it)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), None


def _find(name: str, folder: Path | None) -> Path:
    if folder is None or not folder.is_dir():
        where = f"--lora-dir {folder} is not a folder" if folder else f"there is no {DEFAULT_LORA_DIR}/"
        raise LdmError(f"<lora:{name}> in the prompt, and {where}; pass --lora-dir DIR with {name}.safetensors in it")
    for candidate in (folder / f"{name}.safetensors", folder / name):
        if candidate.is_file():
            return candidate
    there = sorted(p.stem for p in folder.glob("*.safetensors"))
    raise LdmError(f"<lora:{name}> in the prompt: no {name}.safetensors in {folder}; there: "
                   f"{', '.join(there) if there else 'no LoRA at all'}")  # fmt: skip


def resolve(args: argparse.Namespace, prompts: list[str], recorded: ImageParameters | None) -> tuple[LoraChoice, ...]:
    """The run's LoRAs: the ``--lora`` flags in order, then the prompts' tags (the same in every prompt)."""
    if args.lora_scale is not None and not math.isfinite(args.lora_scale):
        raise LdmError(f"--lora-scale must be a finite number, got {args.lora_scale}; 1 is the LoRA as trained")
    scales = {r.name: r.scale for r in recorded.loras} if recorded else {}
    loras = []
    for text in args.lora:
        path, scale = parse_flag(text)
        scale = scale if scale is not None else args.lora_scale if args.lora_scale is not None else scales.get(path.name, 1.0)
        if not math.isfinite(scale):
            raise LdmError(f"--lora {text}: the scale must be a finite number; 1 is the LoRA as trained")
        loras.append(LoraChoice(path, scale))
    tags = {prompt_tags(prompt) for prompt in prompts}
    if len(tags) > 1:
        asked = " and ".join(" ".join(f"<lora:{n}:{w}>" for n, w in t) or "none" for t in sorted(tags))
        raise LdmError(f"the prompts ask for different LoRAs ({asked}); a run merges one set of LoRAs into the model, "
                       "so give these prompts in separate runs")  # fmt: skip
    folder = args.lora_dir or (DEFAULT_LORA_DIR if DEFAULT_LORA_DIR.is_dir() else None)
    for name, weight in next(iter(tags), ()):
        loras.append(LoraChoice(_find(name, folder), weight))
    return tuple(loras)


@functools.cache  # once per run, not once per image
def record(loras: tuple[LoraChoice, ...]) -> tuple[LoraRecord, ...]:
    """What the PNG records of the LoRAs: name, scale and AutoV2 hash of each."""
    from ldm.train.lora import lora_hash

    return tuple(LoraRecord(name=c.path.name, scale=c.scale, hash=lora_hash(c.path)) for c in loras)


def warn_about_loras(loras: tuple[LoraChoice, ...], recorded: ImageParameters | None, png: Path | None) -> None:
    """Where ``--from-png``'s image was made with LoRAs this run leaves out."""
    if recorded is None or not recorded.loras:
        return
    missing = [r.name for r in recorded.loras if r.name not in {c.path.name for c in loras}]
    if missing:
        print(f"warning: {png} was made with LoRA {', '.join(missing)}; pass --lora FILE to reproduce it", file=sys.stderr)
