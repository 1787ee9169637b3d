"""Latents files: a safetensors file of (B, C, h, w) scaled latents with what decoding them needs in its metadata.

Written by ``python -m ldm vae encode``; the metadata keeps the scaling factor, the VAE's sha256 and the source
names and sizes, so ``decode`` unscales by the right factor and warns when another VAE decodes them.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.errors import LdmError
from ldm.formats.bundle import Bundle

LATENTS_KEY = "latents"
LATENTS_FORMAT = "ldm-latents"


class MetaKey(str, enum.Enum):
    """safetensors metadata keys of a latents file (all values are strings)."""

    FORMAT = "format"
    SCALING_FACTOR = "scaling_factor"  # float: latents = raw VAE latents × this
    VAE_SHA256 = "vae_sha256"  # sha256 of the bundle's vae.safetensors
    SOURCES = "sources"  # JSON list of {"name", "width", "height"} (size before any resize)
    BUNDLE = "bundle"  # bundle name


def latents_metadata(bundle: Bundle, sources: Sequence[dict]) -> dict[str, str]:
    """The safetensors metadata that lets ``decode`` check and unscale a latents file."""
    return {
        MetaKey.FORMAT.value: LATENTS_FORMAT,
        MetaKey.SCALING_FACTOR.value: repr(float(bundle.config.vae.scaling_factor)),
        MetaKey.VAE_SHA256.value: bundle.manifest.get("files", {}).get("vae.safetensors", ""),
        MetaKey.SOURCES.value: json.dumps(list(sources)),
        MetaKey.BUNDLE.value: bundle.name,
    }


def read_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A latents file written by ``encode`` → (B, C, h, w) latents and its metadata (scaling factor checked)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LdmError(f"{path}: no such file; pass the .safetensors file that `python -m ldm vae encode` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            latents = f.get_tensor(LATENTS_KEY) if LATENTS_KEY in keys else None
    except (SafetensorError, OSError) as exc:
        raise LdmError(
            f"{path} is not a readable safetensors file ({exc}); pass a file written by `python -m ldm vae encode`"
        ) from None
    if latents is None or latents.dim() != 4:
        raise LdmError(
            f"{path} holds no (B, C, h, w) '{LATENTS_KEY}' tensor; pass a file written by `python -m ldm vae encode`"
        )
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        bad = "not floating point" if not latents.is_floating_point() else f"{int((~torch.isfinite(latents)).sum())} NaN or inf values"
        raise LdmError(f"{path}'s latents hold {bad}, which decode to a black or garbage image; encode the images again")
    try:
        scale = float(metadata[MetaKey.SCALING_FACTOR.value])
    except (KeyError, ValueError):
        raise LdmError(
            f"{path} has no scaling_factor metadata, so its latents' scale is unknown; encode the images again with "
            "`python -m ldm vae encode`"
        ) from None
    if not math.isfinite(scale) or scale <= 0:
        raise LdmError(f"{path} has an invalid scaling_factor {scale}; encode the images again")
    return latents, metadata


def source_names(metadata: dict[str, str], count: int) -> list[str]:
    try:
        sources = json.loads(metadata.get(MetaKey.SOURCES.value, "[]"))
        names = [str(s["name"]) for s in sources]
    except (json.JSONDecodeError, TypeError, KeyError):
        names = []
    return names if len(names) == count else [f"{i:05d}.png" for i in range(count)]
