"""Built-in datasets, named `builtin:<name>/<part>` in a recipe, built on first use.

The one place that parses the `builtin:` prefix: `data.resolve_data_path` turns a spec into the
folder it names, and evaluation labels tables with `label`.
"""
from __future__ import annotations

from pathlib import Path

from embed.errors import DataError

PREFIX = "builtin:"
KNOWN = ("stdlib-code/train", "stdlib-code/test")


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def label(spec: str) -> str:
    """`builtin:stdlib-code/test` -> `stdlib-code-test` (a table column, a file name)."""
    return spec.removeprefix(PREFIX).replace("/", "-")


def resolve(spec: str) -> str:
    """The BEIR folder a `builtin:` spec names, building the dataset if it is not built yet."""
    dataset, _, part = spec.removeprefix(PREFIX).partition("/")
    if dataset != "stdlib-code":
        raise DataError(f"unknown built-in dataset '{spec}' (known: {', '.join(PREFIX + k for k in KNOWN)})")
    from embed.datasets.stdlib_code import build_stdlib_code_search, default_build_dir

    out = default_build_dir()
    build_stdlib_code_search(out)
    return str(Path(out) / (part or "test"))
