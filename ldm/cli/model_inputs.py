"""generate.py's model files: ``--model`` as a single-file checkpoint (converted once into a cached bundle) and
``--vae``, an autoencoder swapped in, read and checked against the model before any weights load, and what the PNG
records of it; ``--tiny-vae``, the decode by the bundle's tiny autoencoder, checked for the same way.

The conversion is :mod:`ldm.formats.single_file`; the VAE layouts are :mod:`ldm.formats.vae_file`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import LdmError
from ldm.formats.bundle import has_tiny_vae
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
    g.add_argument("--tiny-vae", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the images with the bundle's tiny autoencoder (train_tiny_vae.py): faster, and close "
                        "to its VAE's pixels (see BENCHMARKS.md); --no-tiny-vae undoes a --from-png's")  # fmt: skip


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


def check_tiny_vae(tiny: bool, model: Path, *, vae: VaeFile | None, from_png: Path | None) -> None:
    """``--tiny-vae`` (given, or recorded by ``--from-png``'s image) needs a bundle with a tiny autoencoder, and
    cannot go with ``--vae``, which replaces the decoder it was distilled from."""
    if not tiny:
        return
    why = f"{from_png} was decoded by a tiny autoencoder (VAE Decoder: TAESD)" if from_png else "--tiny-vae"
    undo = "pass --no-tiny-vae" if from_png else "drop --tiny-vae"
    if vae is not None:
        raise LdmError(f"{why}, and --vae swaps in another autoencoder; pass one of the two")
    if not model.is_dir() or not has_tiny_vae(model):
        raise LdmError(f"{why}, but the model {model} has no tiny autoencoder; distil one into it with `python "
                       f"train_tiny_vae.py --bundle {model} --data IMAGES --out runs/tiny-vae`, or {undo}")  # fmt: skip


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

