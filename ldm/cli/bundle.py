"""``python -m ldm bundle``: create, inspect, export, convert and import model bundles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ldm.cli.common import ArgumentParser, check_output, run_cli, seed
from ldm.config import apply_overrides, dump_yaml
from ldm.errors import BundleError, ConfigError, LdmError
from ldm.formats.bundle import create_bundle, load_bundle, read_config, read_manifest, save_bundle
from ldm.formats.diffusers import export_diffusers, import_diffusers
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
    export = sub.add_parser("export", help="write a diffusers Stable Diffusion folder")
    export.add_argument("bundle", type=Path)
    export.add_argument("out", type=Path)
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
    imp = sub.add_parser("import", help="read a local diffusers Stable Diffusion folder into a bundle")
    imp.add_argument("diffusers_folder", type=Path)
    imp.add_argument("out", type=Path)
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


def export(args) -> None:
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
    check_output(args.out, folder=True, flag="the output folder")
    bundle = save_bundle(import_diffusers(args.diffusers_folder), args.out)
    print(f"imported {args.diffusers_folder} into bundle {bundle}")


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
