"""``python -m ldm COMMAND ...``: every command of the project (see :mod:`ldm.cli`)."""

from ldm.cli import main

main()
