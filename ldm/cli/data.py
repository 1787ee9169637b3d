"""``python -m ldm data check|shard``: check a captioned image folder, or write it as webdataset shards.

``check DIR`` prints the scan report of the folder; ``shard DIR OUT --size N`` writes its usable pairs as webdataset
shards, N samples a shard (see :mod:`ldm.data.shard_writer`).

Exit status 0 when the folder has usable image/caption pairs, 2 (with one ``error:`` line) when the
folder is missing, its layout is unknown, its caption table lacks the columns, the ``--split`` is not there, a shard
is truncated or empty, or nothing in it is usable; for ``shard`` also when ``--size`` is below 1 or OUT is not empty
(``--force`` replaces the shards of an earlier write, and nothing else). ``shard`` prints the same report as
``check`` first, so what is skipped is counted there, then the shards written and the ``--data`` pattern naming them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import add_layout_arguments, layout_settings
from ldm.data.config import DataConfig
from ldm.data.scan import report_dataset
from ldm.data.shard_writer import check_shard_folder, shard_pattern, write_shards
from ldm.errors import LdmError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m ldm data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="scan a dataset folder and print what is usable and what is wrong")
    shard = commands.add_parser("shard", help="write the usable pairs of a dataset folder as webdataset .tar shards")
    for command in (check, shard):
        command.add_argument("path", metavar="DIR", help="dataset folder (or a .tar shard, or shards-{000..009}.tar)")
    shard.add_argument("out", metavar="OUT", help="folder for the shards 000000.tar, 000001.tar, ... (new)")
    shard.add_argument("--size", type=int, required=True, help="samples a shard (e.g. 1000)")
    shard.add_argument("--force", action="store_true", help="OUT holds the shards of an earlier write: replace them "
                       "(nothing else in OUT is ever deleted)")  # fmt: skip
    for command in (check, shard):
        add_layout_arguments(command)
        command.add_argument("--min-side", type=int, default=32,
                             help="skip images whose shorter side is below this (px)")  # fmt: skip
        command.add_argument("--resolution", type=int, default=512,
                             help="training resolution, to count upscaled images")  # fmt: skip
        command.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise LdmError(f"--workers must be at least 1, got {args.workers}; leave it out for min(8, CPUs)")
    try:
        config = DataConfig(path=args.path, min_side=args.min_side, resolution=args.resolution, **layout_settings(args))
    except ValueError as exc:
        build_parser().error(str(exc))
    progress = sys.stderr.isatty()
    if args.command == "check":
        report_dataset(config, workers=args.workers, progress=progress)
        return 0
    if args.size < 1:
        raise LdmError(f"--size is the number of samples a shard holds and must be at least 1, got {args.size}")
    check_shard_folder(Path(args.out), force=args.force)  # before the scan, which may take long
    report = report_dataset(config, workers=args.workers, progress=progress)
    shards = write_shards(report, args.out, args.size, force=args.force, progress=progress)
    samples, files = len(report.pairs), len(shards)
    print(f"wrote {samples} sample{'s' * (samples != 1)} in {files} shard{'s' * (files != 1)} of up to {args.size} to "
          f"{args.out}; train on them with --data '{shard_pattern(shards)}'")  # fmt: skip
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
