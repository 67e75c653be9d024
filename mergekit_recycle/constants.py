"""Environment variables and defaults, parsed in one place."""

import os

_TRUE = {"1", "true", "yes", "on"}


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in _TRUE


# Show full tracebacks instead of the one-line error messages of the CLI.
MERGEKIT_RECYCLE_DEBUG: bool = _env_bool("MERGEKIT_RECYCLE_DEBUG")

# The registered name of our merge method, as written in mergekit YAML files.
RECYCLE_LINEAR = "recycle_linear"

