"""``python -m ldm.data check DIR``: print the scan report of a captioned image folder.

Exit status 0 when the folder has usable image/caption pairs, 2 (with one ``error:`` line) when the
folder is missing, its layout is unknown, or nothing in it is usable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ldm.data.config import DataConfig, Layout
from ldm.data.scan import report_dataset
from ldm.errors import ArgumentParser, run_cli


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m ldm.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="scan a dataset folder and print what is usable and what is wrong")
    check.add_argument("path", metavar="DIR", help="dataset folder")
    check.add_argument("--layout", choices=[layout.value for layout in Layout], help="default: detect")
    check.add_argument("--metadata", help="caption table inside DIR (default metadata.jsonl / metadata.csv)")
    check.add_argument("--image-column", help="default file_name (imagefolder) / image (csv)")
    check.add_argument("--caption-column", help="default text (imagefolder) / caption (csv)")
    check.add_argument("--caption-extension", default=".txt", help="kohya caption files (default .txt)")
    check.add_argument("--min-side", type=int, default=32, help="skip images whose shorter side is below this (px)")
    check.add_argument("--resolution", type=int, default=512, help="training resolution, to count upscaled images")
    check.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = DataConfig(
            path=args.path, layout=Layout(args.layout) if args.layout else None, metadata=args.metadata,
            image_column=args.image_column, caption_column=args.caption_column,
            caption_extension=args.caption_extension, min_side=args.min_side, resolution=args.resolution,
        )  # fmt: skip
    except ValueError as exc:
        build_parser().error(str(exc))
    report_dataset(config, workers=args.workers, progress=sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
