"""The user-facing errors: each is printed as one line by `embed.cli.run_main` (no traceback).

One module so that every layer can raise them without importing a higher one."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a recipe or on the command line; scripts print it as one line."""


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


class ModelLoadError(ValueError):
    """The model path or id cannot be loaded (a user mistake: printed as one line)."""


class MissingPackageError(RuntimeError):
    """An embedded default was asked for but its PyPI package is not installed."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, MissingPackageError)
