"""Entry-point wrapper: user mistakes become one line on stderr and exit code 2, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from embed.errors import USER_ERRORS


def run_main(main: Callable[[], object]) -> None:
    """Call `main`; print `error: <message>` and exit 2 on a user error (bad recipe, data, path)."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


Log = Callable[[str], None]  # where a long job reports progress: print on the main process, a no-op elsewhere


def log_line(msg: str) -> None:
    print(msg, flush=True)
