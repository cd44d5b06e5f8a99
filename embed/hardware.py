"""Precision and device facts, decided in one visible place and printed with the reason."""
from __future__ import annotations

import os

import torch

from embed.config import ConfigError


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
        elif major >= 8:
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
    if requested == "bf16" and cuda and major < 8:
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
