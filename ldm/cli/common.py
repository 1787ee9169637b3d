"""What every command shares: one-line argument errors, and the runner that turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ldm.errors import LdmError

EXIT_USAGE = 2
# The model this project ships, found from the package's own place, so every command finds it from any folder.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "emoji-tiny"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2, not the usage block."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; an :class:`LdmError` becomes ``error: ...`` on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except LdmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_now(code: int) -> NoReturn:
    """End a finished command at once, skipping the interpreter's teardown.

    With torch, diffusers and transformers loaded, tearing the interpreter down takes 1.5-2 s on 2 CPU cores,
    longer than generating an emoji. Everything the command wrote is closed by then; the standard streams and
    logging are flushed here. A process that started torch.compile's worker pool exits normally instead.
    """
    if "torch._inductor.async_compile" in sys.modules:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to deliver
            pass
    logging.shutdown()
    os._exit(code)
