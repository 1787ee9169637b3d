"""User-facing errors: each message names the problem and the fix, on one line (``ldm.cli.common`` prints them)."""

from __future__ import annotations


class LdmError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""


class ConfigError(LdmError):
    """A config file or override that does not fit the typed config."""


class BundleError(LdmError):
    """A model bundle that is missing, incomplete or corrupt."""
