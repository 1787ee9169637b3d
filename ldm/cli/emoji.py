"""``python -m ldm emoji OUT_DIR --size 64``: render the emoji dataset (see :mod:`ldm.data.emoji`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ldm.cli.common import ArgumentParser, run_cli
from ldm.data.emoji import DEFAULT_FONT, EmojiConfig, build_emoji_dataset


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m ldm emoji", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="writes OUT_DIR/train and OUT_DIR/test (imagefolder)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--font", default=str(DEFAULT_FONT), help=f"Noto Color Emoji font (default {DEFAULT_FONT})")
    parser.add_argument("--limit", type=int, help="stop after N pairs (for tests)")
    parser.add_argument("--only", nargs="+", default=[], metavar="EMOJI", help="render just these emoji")
    parser.add_argument("--no-skin-tones", action="store_true", help="keep only the default-tone emoji")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/train and OUT_DIR/test")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = EmojiConfig(
            out_dir=args.out_dir, size=args.size, font=args.font, limit=args.limit, only=tuple(args.only),
            skin_tones=not args.no_skin_tones,
        )  # fmt: skip
    except ValueError as exc:
        build_parser().error(str(exc))
    summary = build_emoji_dataset(config, overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(summary.format())
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
