"""generate.py as the tests call it (shared by the tests): a run's exit code, and a written PNG's pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm.cli import generate as generate_cli
from ldm.cli.common import run_cli


def run(argv) -> int:
    """``python generate.py ARGV`` in this process: its exit code (errors print one line, as for a user)."""
    return run_cli(generate_cli.main, [str(a) for a in argv])


def pixels(path) -> np.ndarray:
    """A PNG's RGB pixels, signed, so that differences of two images do not wrap around."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
