"""``python -m ldm.data check|shard ...``: the same command as ``python -m ldm data`` (see :mod:`ldm.cli.data`)."""

from ldm.cli.data import entry

entry()
