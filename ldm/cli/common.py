"""What every command shares: one-line argument errors, and the runner that turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ldm.errors import LdmError

EXIT_USAGE = 2
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: a defect of ours, not the user's input
# The model this project ships, found from the package's own place, so every command finds it from any folder.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "emoji-tiny"
DEBUG_FLAG = "--debug"
MESSAGE_LIMIT = 300  # characters of an unexpected exception's message: one line, however big the input was


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2, not the usage block; every command
    takes ``--debug`` (read by :func:`run_cli`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("add_help", True):  # not on the parents= fragments, which would then clash
            self.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an internal error")

    def error(self, message: str):  # argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


SEED_LIMIT = 1 << 63  # torch generators take 64-bit seeds; image i uses seed + i, so leave room below 2^64


def seed(text: str) -> int:
    """argparse type of a ``--seed``: an integer in [0, 2^63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is out of range: seeds run from 0 to 2^63 - 1")
    return value


def check_output(path: Path, *, folder: bool, flag: str) -> Path:
    """Make sure ``path`` can be written before any work starts, creating nothing: a folder, or a file, whose
    nearest existing parent folder takes a new file. A path of the wrong kind, or where nothing may be written,
    is an :class:`LdmError` naming ``flag``."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise LdmError(f"{flag} {path} is an existing file, not a folder; choose a folder path")
    if not folder and path.is_dir():
        raise LdmError(f"{flag} {path} is a folder; give a file path inside it, e.g. {path / 'out'}")
    target = path if folder else path.parent
    existing = next(p for p in [target, *target.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise LdmError(f"{flag} {path}: {existing} is a file, so nothing can be written under it; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the only sure test of "may write here"
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LdmError(f"cannot write to {flag} {path} ({reason}); choose a folder you can write to") from None
    return path


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and turn what it raises into an exit status and one line on stderr.

    An :class:`LdmError` (bad input: its message names the problem and the fix) is ``error: ...`` and status 2.
    Anything else is a defect: ``error: internal error: ...`` and status 70, with the traceback under ``--debug``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except LdmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the net under every command: no traceback unless asked for
        if DEBUG_FLAG in argv:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or "(no message)"
        if len(message) > MESSAGE_LIMIT:
            message = message[:MESSAGE_LIMIT] + "…"
        print(f"error: internal error: {type(exc).__name__}: {message}; please report it with {DEBUG_FLAG}'s "
              "traceback", file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


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
