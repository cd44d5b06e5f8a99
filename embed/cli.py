"""Entry-point wrapper: user mistakes become one line on stderr and exit code 2, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from embed.config import ConfigError


def user_errors() -> tuple[type[BaseException], ...]:
    from embed.data import DataError
    from embed.model import ModelLoadError
    from embed.paths import MissingPackageError

    return ConfigError, DataError, MissingPackageError, ModelLoadError


def run_main(main: Callable[[], object]) -> None:
    """Call `main`; print `error: <message>` and exit 2 on a user error (bad recipe, data, path)."""
    try:
        main()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
