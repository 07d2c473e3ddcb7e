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


def validated(model: type, raw: dict | None, prefix: str):
    """`model(**raw)` for a pydantic model; its first complaint as a one-line ConfigError whose field
    is `prefix` + the key's path (an unknown key lists the accepted ones; a field's description
    is added to the message; a ConfigError raised by a validator passes through)."""
    from pydantic import ValidationError

    try:
        return model(**(raw or {}))
    except ValidationError as e:
        raise config_error(e, model, prefix) from None


def config_error(e, model: type, prefix: str) -> ConfigError:
    """The ConfigError for pydantic ValidationError `e` raised by `model` (see `validated`)."""
    err = e.errors()[0]
    ctx = (err.get("ctx") or {}).get("error")
    if isinstance(ctx, ConfigError):
        return ctx
    loc = [str(x) for x in err["loc"] if not str(x).startswith("function-after")]
    field = ".".join(p for p in (prefix, *loc) if p) or "settings"
    parent, info = model, None
    for i, part in enumerate(loc):
        fields = getattr(parent, "model_fields", {})
        info = fields.get(part)
        if info is None:
            break
        if i < len(loc) - 1:
            parent = info.annotation
    if err["type"] == "extra_forbidden":
        known = sorted(getattr(parent, "model_fields", {}))
        return ConfigError(field, loc[-1], "one of " + ", ".join(known) if known else "no settings")
    msg = err["msg"].removeprefix("Value error, ")
    if info is not None and info.description:
        msg = f"{msg} ({info.description})"
    return ConfigError(field, err.get("input"), msg)
