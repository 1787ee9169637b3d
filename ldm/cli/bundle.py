"""``python -m ldm bundle``: create, inspect, export, convert and import model bundles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ldm.cli.common import ArgumentParser, check_output, run_cli, seed
from ldm.config import apply_overrides, dump_yaml, to_dict
from ldm.errors import BundleError, ConfigError, LdmError
from ldm.formats.bundle import (
    TINY_VAE_CONFIG,
    create_bundle,
    load_bundle,
    read_config,
    read_manifest,
    read_tiny_config,
    save_bundle,
    save_new_bundle,
)
from ldm.formats.diffusers import choose_variant, export_diffusers, import_diffusers
from ldm.formats.single_file import export_single_file, import_single_file, parse_prediction
from ldm.models.presets import PRESETS, get_preset
from ldm.runtime import DTYPES


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m ldm bundle", description="Create, inspect, export and import model bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="a randomly initialised bundle from a preset")
    create.add_argument("preset", choices=sorted(PRESETS))
    create.add_argument("out", type=Path)
    create.add_argument("--seed", type=seed, default=0)
    create.add_argument("--name", help="model name written into image metadata (default: the folder name)")
    create.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set unet.layers_per_block=1 (repeatable)")  # fmt: skip
    create.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    info = sub.add_parser("info", help="print a bundle's config and manifest")
    info.add_argument("bundle", type=Path)
    export = sub.add_parser("export", help="write a diffusers Stable Diffusion folder, or a single-file checkpoint")
    export.add_argument("bundle", type=Path)
    export.add_argument("out", type=Path, nargs="?", help="the diffusers folder to write")
    export.add_argument("--single-file", type=Path, metavar="FILE",
                        help="write one .safetensors file in the CompVis layout (A1111, ComfyUI) instead")  # fmt: skip
    convert = sub.add_parser("convert", help="write a copy with its weights in another precision (fp16 to ship)")
    convert.add_argument("bundle", type=Path)
    convert.add_argument("out", type=Path)
    convert.add_argument("--dtype", required=True, choices=sorted(DTYPES), help="precision of the stored weights")
    convert.add_argument("--no-extras", action="store_true", help="leave optional files (the CLIP) behind")
    convert.add_argument("--name", help="model name written into image metadata (default: the bundle's own)")
    convert.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    convert.add_argument("--base", type=Path, metavar="BUNDLE",
                         help="borrow from this bundle every part whose weights equal its own (a fine-tune then ships "
                              "its UNet alone); the two folders must then stay side by side")  # fmt: skip
    imp = sub.add_parser("import", help="read a diffusers Stable Diffusion folder or a single-file checkpoint")
    imp.add_argument("source", type=Path, help="a diffusers pipeline folder, or an SD 1.x/2.x .safetensors file")
    imp.add_argument("out", type=Path)
    imp.add_argument("--variant", help="diffusers folder: the weights saved with this variant, e.g. fp16 (default: "
                                       "the plain ones, else the only variant there is)")  # fmt: skip
    imp.add_argument("--prediction", choices=("epsilon", "v"), default=None,
                     help="single file: what the UNet predicts, which weights cannot show (default: what the file "
                          "records, else ε for SD 1.x and inpainting, v for SD 2.x as in A1111's SD 2.x default "
                          "config)")  # fmt: skip
    imp.add_argument("--allow-pickle", action="store_true",
                     help="single file: read a pickled .ckpt, with torch.load(weights_only=True)")  # fmt: skip
    return parser


def _refuse_existing(out: Path, *, force: bool) -> None:
    if (out / "manifest.json").exists() and not force:
        raise LdmError(f"{out} already holds a bundle; pass --force to overwrite it or choose another path")


def create(args) -> None:
    _refuse_existing(args.out, force=args.force)
    check_output(args.out, folder=True, flag="the output folder")
    config = apply_overrides(get_preset(args.preset), args.overrides)
    bundle = create_bundle(config, seed=args.seed, name=args.name or args.out.name)
    save_bundle(bundle, args.out)
    params = sum(p.numel() for m in bundle.modules().values() for p in m.parameters())
    print(f"created {args.preset} bundle at {args.out} ({params / 1e6:.2f}M parameters, hash {bundle.short_hash})")


def info(args) -> None:
    manifest = read_manifest(args.bundle)
    try:
        config = dump_yaml(read_config(args.bundle))  # checked: the text printed is a config this ldm reads
    except ConfigError as exc:
        raise BundleError(f"{args.bundle / 'model.yaml'}: {exc}") from None
    print(config, end="")
    print(json.dumps({k: v for k, v in manifest.items() if k not in ("files", "extras")}, indent=2))
    if manifest.get("extras"):
        print(f"optional files: {', '.join(sorted(manifest['extras']))}")
    if TINY_VAE_CONFIG in manifest["files"]:
        tiny = to_dict(read_tiny_config(args.bundle, manifest, read_config(args.bundle)))
        print(f"tiny autoencoder ({TINY_VAE_CONFIG}): {', '.join(f'{k} {v}' for k, v in tiny.items())}")


def export(args) -> None:
    if (args.out is None) == (args.single_file is None):
        raise LdmError("pass an output folder (diffusers) or --single-file FILE.safetensors: one of the two")
    if args.single_file is not None:
        if args.single_file.suffix != ".safetensors":
            raise LdmError(f"--single-file {args.single_file}: name it .safetensors, the format it is written in")
        if args.single_file.exists():
            raise LdmError(f"{args.single_file} already exists; choose another path or delete it first")
        check_output(args.single_file, folder=False, flag="--single-file")
        _, notes = export_single_file(load_bundle(args.bundle), args.single_file)
        for note in notes:
            print(f"note: {note}")
        print(f"exported {args.bundle} to single file {args.single_file}")
        return
    check_output(args.out.parent, folder=True, flag="the output folder's parent")
    export_diffusers(load_bundle(args.bundle), args.out)
    print(f"exported {args.bundle} to diffusers folder {args.out}")


def convert(args) -> None:
    _refuse_existing(args.out, force=args.force)
    if args.out.resolve() == args.bundle.resolve():
        raise LdmError("convert writes a new bundle; choose an output folder other than the input")
    check_output(args.out, folder=True, flag="the output folder")
    bundle = load_bundle(args.bundle).to(dtype=DTYPES[args.dtype])
    if args.no_extras:
        bundle.extras = {}
    if args.name:
        bundle.name = args.name
    save_bundle(bundle, args.out, base=args.base)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    borrowed = bundle.manifest.get("borrowed", [])
    note = f", borrowing {', '.join(b for b in borrowed if '/' not in b) or 'the tokenizer'} from {args.base}" if borrowed else ""
    print(f"wrote {args.dtype} bundle {args.out} ({size / 1e6:.1f} MB, hash {bundle.short_hash}{note})")


def import_(args) -> None:
    if (args.out / "manifest.json").exists():
        raise LdmError(f"{args.out} already holds a bundle; choose another path")
    if args.out.is_dir() and any(args.out.iterdir()):
        raise LdmError(f"{args.out} is not empty; choose a new folder or an empty one")
    check_output(args.out, folder=True, flag="the output folder")
    source = args.source
    if not source.exists():
        raise LdmError(f"no such file or folder: {source}; pass a diffusers pipeline folder or a .safetensors file")
    if source.is_file():
        if args.variant:
            raise LdmError("--variant picks among a diffusers folder's weights; a single file has one set")
        prediction = parse_prediction(args.prediction) if args.prediction else None
        bundle, found = import_single_file(source, prediction=prediction, allow_pickle=args.allow_pickle)
        print(f"found {found.describe()}")
        for note in found.notes:
            print(f"note: {note}")
    else:
        if args.prediction or args.allow_pickle:
            raise LdmError("--prediction and --allow-pickle are for single files; a diffusers folder states its "
                           "prediction and holds safetensors")  # fmt: skip
        variant = choose_variant(source, args.variant)
        if variant:
            print(f"using the {variant} weights of {source}")
        bundle = import_diffusers(source, variant=variant)
    save_new_bundle(bundle, args.out)  # whole or not at all
    print(f"imported {source} into bundle {args.out}")


COMMANDS = {"create": create, "info": info, "export": export, "convert": convert, "import": import_}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
