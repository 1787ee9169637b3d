"""``python -m ldm data check DIR``: print the scan report of a captioned image folder.

Exit status 0 when the folder has usable image/caption pairs, 2 (with one ``error:`` line) when the
folder is missing, its layout is unknown, its caption table lacks the columns, the ``--split`` is not there, a shard
is truncated or empty, or nothing in it is usable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import add_layout_arguments, layout_settings
from ldm.data.config import DataConfig
from ldm.data.scan import report_dataset
from ldm.errors import LdmError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m ldm data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="scan a dataset folder and print what is usable and what is wrong")
    check.add_argument("path", metavar="DIR", help="dataset folder (or a .tar shard, or shards-{000..009}.tar)")
    add_layout_arguments(check)
    check.add_argument("--min-side", type=int, default=32, help="skip images whose shorter side is below this (px)")
    check.add_argument("--resolution", type=int, default=512, help="training resolution, to count upscaled images")
    check.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise LdmError(f"--workers must be at least 1, got {args.workers}; leave it out for min(8, CPUs)")
    try:
        config = DataConfig(path=args.path, min_side=args.min_side, resolution=args.resolution, **layout_settings(args))
    except ValueError as exc:
        build_parser().error(str(exc))
    report_dataset(config, workers=args.workers, progress=sys.stderr.isatty())
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
