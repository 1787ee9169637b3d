"""generate.py's model files: ``--model`` as a single-file checkpoint (converted once into a cached bundle) and
``--vae``, an autoencoder swapped in, read and checked against the model before any weights load, and what the PNG
records of it.

The conversion is :mod:`ldm.formats.single_file`; the VAE layouts are :mod:`ldm.formats.vae_file`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import LdmError
from ldm.formats.pngmeta import ImageParameters
from ldm.formats.single_file import cached_bundle
from ldm.formats.vae_file import VaeFile, check_vae_fits, read_vae
from ldm.models.presets import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files")
    g.add_argument("--vae", type=Path, metavar="FILE|FOLDER",
                   help="swap in this autoencoder: a VAE .safetensors file (CompVis or diffusers keys), a diffusers "
                        "VAE folder, or a bundle; it must fit the model's latents")  # fmt: skip
    g.add_argument("--vae-scaling-factor", type=float, default=None, metavar="S",
                   help="the --vae's latent scaling factor, where its config does not say it (a bare CompVis file "
                        "of 4 latent channels takes SD's 0.18215)")  # fmt: skip


def resolve_model(path: Path) -> Path:
    """A bundle folder as it is; a single-file checkpoint as its cached bundle, converted on first use (what was found
    goes to stderr then, with what was assumed)."""
    if not path.is_file():
        return path
    folder, found = cached_bundle(path)
    if found is not None:
        print(f"{path}: {found.describe()}; converted once into {folder}", file=sys.stderr)
        for note in found.notes:
            print(f"note: {note}", file=sys.stderr)
    return folder


def resolve_vae(args: argparse.Namespace, config: ModelConfig) -> VaeFile | None:
    """The --vae, read as far as its config and checked against the model's latents; None without --vae."""
    if args.vae is None:
        if args.vae_scaling_factor is not None:
            raise LdmError("--vae-scaling-factor states the factor of a --vae; pass --vae FILE too")
        return None
    vae = read_vae(args.vae, scaling_factor=args.vae_scaling_factor)
    check_vae_fits(vae, config)
    for note in vae.notes:
        print(f"note: --vae {args.vae}: {note}", file=sys.stderr)
    return vae


def warn_about_vae(vae: VaeFile | None, recorded: ImageParameters | None, png: Path | None) -> None:
    """Where ``--from-png``'s image was made with another VAE than this run's."""
    if recorded is None or recorded.vae is None:
        return
    if vae is None:
        print(f"warning: {png} was made with VAE {recorded.vae} (hash {recorded.vae_hash}); pass --vae FILE to "
              "reproduce it", file=sys.stderr)  # fmt: skip
    elif recorded.vae_hash and recorded.vae_hash != vae.short_hash:
        print(f"warning: {png} was made with VAE hash {recorded.vae_hash}, this VAE is {vae.short_hash}",
              file=sys.stderr)  # fmt: skip


def vae_record(vae: VaeFile | None) -> dict:
    """What the PNG records of the VAE: A1111's ``VAE`` and ``VAE hash``."""
    return {} if vae is None else {"vae": vae.name, "vae_hash": vae.short_hash}

