"""One exception family for everything a user can get wrong.

Every message names the field, the value given and what would be accepted, on one line, so the
command line can print it as is and exit 2.
"""

from __future__ import annotations


class PruneflowError(Exception):
    """A problem the user can fix (bad setting, missing file, unreachable store...)."""

    exit_code = 2

    def __init__(self, field: str, value: object, accepted: str, hint: str | None = None):
        self.field, self.value, self.accepted, self.hint = field, value, accepted, hint
        msg = f"{field}: got {value!r}; accepted: {accepted}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg.replace("\n", " "))


class ConfigError(PruneflowError):
    """A setting is invalid (wrong type, out of range, unknown key or name)."""


class DataError(PruneflowError):
    """A text source or model path cannot be used."""


class StorageError(PruneflowError):
    """The artifact store or an output folder cannot be read or written."""
