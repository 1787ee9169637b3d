"""``python -m ldm vae``: encode images to latents and back with a bundle's VAE, and measure reconstructions.

    python -m ldm vae encode a.png b.png -o latents.safetensors --size 256
    python -m ldm vae decode latents.safetensors -o decoded/
    python -m ldm vae roundtrip a.png -o roundtrip/          # original | reconstruction, PSNR and SSIM
    python -m ldm vae eval held-out/ --limit 500 --json vae-eval.json
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from ldm.cli.common import DEFAULT_MODEL, ArgumentParser, check_output, run_cli
from ldm.errors import LdmError
from ldm.eval.metrics import psnr, ssim
from ldm.eval.reconstruction import SSIM_MIN_SIDE, evaluate_folder, load_inception_features
from ldm.formats.bundle import Bundle, load_bundle, read_config
from ldm.formats.latents import LATENTS_KEY, MetaKey, latents_metadata, read_latents, source_names
from ldm.images import check_size, find_images, load_image, output_names, save_png, signed_to_unit
from ldm.io import save_tensors, write_json
from ldm.models.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling, decode, encode_images, reconstruct
from ldm.runtime import DTYPES, resolve_device, resolve_dtype


def warn(message: str) -> None:
    """A one-line ``warning: ...`` on stderr (the CLI's warnings; library code uses :mod:`warnings`)."""
    print(f"warning: {message}", file=sys.stderr)


class Command(str, enum.Enum):
    """The subcommands."""

    ENCODE = "encode"
    DECODE = "decode"
    ROUNDTRIP = "roundtrip"
    EVAL = "eval"


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap in pixels, on the VAE's grid of ``factor``-pixel latent cells; ``tile=None`` never
    tiles."""

    tile: int | None
    overlap: int
    factor: int  # the VAE's downsampling factor, which image sides must be multiples of too


def build_parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"bundle folder (default: {DEFAULT_MODEL})")
    common.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    common.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="VAE weights and activations")
    common.add_argument("--tile-size", type=int, default=DEFAULT_TILE, metavar="PX",
                        help=f"images with a side above PX pixels are processed in PX×PX tiles "
                        f"(default {DEFAULT_TILE}); a smaller PX forces tiling, 0 turns it off")  # fmt: skip
    common.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP, metavar="PX",
                        help=f"overlap of neighbouring tiles, blended (default {DEFAULT_OVERLAP})")  # fmt: skip
    common.add_argument("--batch-size", type=int, default=8, help="images per VAE batch (default 8)")
    sized = ArgumentParser(add_help=False)
    sized.add_argument("--size", type=int, default=None, metavar="N",
                       help="resize the shorter side to N and centre-crop N×N (a multiple of the VAE's "
                       "downsampling factor, 8 in every preset)")  # fmt: skip

    parser = ArgumentParser(prog="python -m ldm vae", description="Encode, decode and evaluate with a bundle's VAE.")
    sub = parser.add_subparsers(dest="command", required=True)
    encode = sub.add_parser(Command.ENCODE.value, parents=[common, sized], help="images → a latents .safetensors file")
    encode.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    encode.add_argument("-o", "--output", type=Path, required=True, help="latents file to write (.safetensors)")
    dec = sub.add_parser(Command.DECODE.value, parents=[common], help="a latents file → PNGs")
    dec.add_argument("latents", type=Path)
    dec.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs")
    trip = sub.add_parser(Command.ROUNDTRIP.value, parents=[common, sized], help="original | reconstruction PNGs")
    trip.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    trip.add_argument("-o", "--output", type=Path, required=True, help="folder for the side-by-side PNGs")
    ev = sub.add_parser(Command.EVAL.value, parents=[common, sized], help="mean PSNR, SSIM, MAE (and rFID) of a folder")
    ev.add_argument("folder", type=Path, metavar="DIR")
    ev.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by path)")
    ev.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    ev.add_argument("--features", type=Path, default=None, metavar="FILE",
                    help="torchvision Inception-v3 state dict (safetensors) for rFID")  # fmt: skip
    return parser


def _check_args(args) -> Tiling:
    """The flags, checked against the bundle's config (its VAE's downsampling factor) before any weights load."""
    if args.batch_size < 1:
        raise LdmError(f"--batch-size must be at least 1, got {args.batch_size}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise LdmError(f"--limit must be at least 1, got {args.limit}")
    factor = read_config(args.model).vae.downsampling_factor
    check_size(getattr(args, "size", None), factor=factor)
    if args.command == Command.ENCODE.value:
        check_output(args.output, folder=False, flag="-o")
    elif args.command in (Command.DECODE.value, Command.ROUNDTRIP.value):
        check_output(args.output, folder=True, flag="-o")
    if getattr(args, "json", None) is not None:
        check_output(args.json, folder=False, flag="--json")
    if args.tile_size < 0:
        raise LdmError(f"--tile-size must be 0 (no tiling) or a multiple of {factor}, got {args.tile_size}")
    tiling = Tiling(tile=args.tile_size or None, overlap=args.tile_overlap if args.tile_size else 0, factor=factor)
    check_tiling(tiling.tile, tiling.overlap, factor=factor)
    return tiling


def _load_vae_bundle(args) -> Bundle:
    bundle = load_bundle(args.model)
    device = resolve_device(args.device)
    bundle.vae.to(device=device, dtype=resolve_dtype(args.dtype, device))
    return bundle


def _load_images(paths: Sequence[Path], size: int | None, factor: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Every image as (3, H, W) in [-1, 1], and its source record {name, width, height}."""
    images, sources = [], []
    for path in paths:
        pixels, (width, height) = load_image(path, factor=factor, size=size)
        images.append(pixels)
        sources.append({"name": path.name, "width": width, "height": height})
    return images, sources


def _encode(args, tiling: Tiling) -> None:
    images, sources = _load_images(args.images, args.size, tiling.factor)
    odd = next((i for i, p in enumerate(images) if p.shape != images[0].shape), None)
    if odd is not None:
        (h0, w0), (h1, w1) = images[0].shape[-2:], images[odd].shape[-2:]
        raise LdmError(
            f"images differ in size ({sources[0]['name']} is {w0}×{h0}, {sources[odd]['name']} is {w1}×{h1}); "
            "pass --size N to resize them all to N×N"
        )
    bundle = _load_vae_bundle(args)
    pixels = torch.stack(images)  # (N, 3, H, W)
    scale = bundle.config.vae.scaling_factor
    chunks = [
        encode_images(bundle.vae, batch, scaling_factor=scale, tile=tiling.tile, overlap=tiling.overlap).cpu()
        for batch in tqdm(pixels.split(args.batch_size), desc="encoding", leave=False)
    ]
    latents = torch.cat(chunks)  # (N, C, H/f, W/f)
    save_tensors(args.output, {LATENTS_KEY: latents}, metadata=latents_metadata(bundle, sources))
    print(f"wrote {args.output}: {len(images)} latents of shape {tuple(latents.shape[1:])}, scaling factor {scale:g}")


def _decode(args, tiling: Tiling) -> None:
    latents, metadata = read_latents(args.latents)
    bundle = _load_vae_bundle(args)
    expected = bundle.config.vae.latent_channels
    if latents.shape[1] != expected:
        raise LdmError(
            f"{args.latents} holds {latents.shape[1]}-channel latents but the VAE of {args.model} takes {expected}; "
            "pass the bundle that encoded them"
        )
    ours = bundle.manifest.get("files", {}).get("vae.safetensors", "")
    theirs = metadata.get(MetaKey.VAE_SHA256.value, "")
    if theirs != ours:
        warn(
            f"{args.latents} was encoded by a different VAE (sha256 {theirs[:12] or 'unknown'}, bundle "
            f"{metadata.get(MetaKey.BUNDLE.value, '?')}) than {args.model}'s ({ours[:12]}); the images may be wrong"
        )
    scale = float(metadata[MetaKey.SCALING_FACTOR.value])  # unscale with the factor the latents were scaled by
    if scale != bundle.config.vae.scaling_factor:
        ours_scale = bundle.config.vae.scaling_factor
        warn(f"{args.latents} was scaled by {scale:g}, {args.model}'s VAE uses {ours_scale:g}; unscaling by {scale:g}")
    names = output_names(source_names(metadata, latents.shape[0]))
    args.output.mkdir(parents=True, exist_ok=True)
    done = 0
    for batch in tqdm(latents.split(args.batch_size), desc="decoding", leave=False):
        images = signed_to_unit(decode(bundle.vae, batch, scaling_factor=scale, tile=tiling.tile, overlap=tiling.overlap))
        for image in images:
            save_png(args.output / names[done], image)
            done += 1
    print(f"wrote {done} PNGs to {args.output}")


def _roundtrip(args, tiling: Tiling) -> None:
    images, sources = _load_images(args.images, args.size, tiling.factor)
    bundle = _load_vae_bundle(args)
    args.output.mkdir(parents=True, exist_ok=True)
    for pixels, name, source in zip(images, output_names([s["name"] for s in sources]), sources, strict=True):
        recon = reconstruct(
            bundle.vae, pixels[None], scaling_factor=bundle.config.vae.scaling_factor, tile=tiling.tile,
            overlap=tiling.overlap,
        )  # fmt: skip
        real, fake = signed_to_unit(pixels[None]), signed_to_unit(recon)  # (1, 3, H, W) in [0, 1]
        save_png(args.output / name, torch.cat([real, fake], dim=-1)[0])  # (3, H, 2W): original | reconstruction
        quality = f"PSNR {psnr(real, fake).item():.2f} dB"
        if min(real.shape[-2:]) >= SSIM_MIN_SIDE:
            quality += f", SSIM {ssim(real, fake).item():.4f}"
        print(f"{source['name']}: {quality} → {args.output / name}")


def _eval(args, tiling: Tiling) -> None:
    find_images(args.folder, limit=args.limit)  # bad folder: fail before loading the model
    bundle = _load_vae_bundle(args)
    features = None
    if args.features is not None:
        features = load_inception_features(args.features, device=bundle.vae.device)
    result = evaluate_folder(
        bundle, args.folder, size=args.size, limit=args.limit, batch_size=args.batch_size, tile=tiling.tile,
        overlap=tiling.overlap, feature_extractor=features,
    )  # fmt: skip
    print(f"images: {result['count']}")
    print(f"PSNR: {result['psnr']:.2f} dB")
    print(f"SSIM: {result['ssim']:.4f}")
    print(f"MAE: {result['mae']:.4f}")
    if "rfid" in result:
        print(f"rFID: {result['rfid']:.3f}")
    elif features is not None:
        print("rFID: skipped (needs at least 2 images)")
    else:
        print("rFID: skipped (no feature extractor; pass --features FILE)")
    if args.json is not None:
        write_json(args.json, {"rfid": None, **result, "model": str(args.model), "folder": str(args.folder)})
        print(f"wrote {args.json}")


COMMANDS = {Command.ENCODE: _encode, Command.DECODE: _decode, Command.ROUNDTRIP: _roundtrip, Command.EVAL: _eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tiling = _check_args(args)
    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise here
    COMMANDS[Command(args.command)](args, tiling)
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
