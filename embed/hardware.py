"""Precision and device facts, decided in one visible place and printed with the reason."""
from __future__ import annotations

import os

import torch


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
        elif not cuda:
            return "no", "fp32: no CUDA device (CPU autocast is slower and lossier than fp32 here)"
        elif major >= 8:
            return "bf16", f"bf16: sm_{major}x has native bf16 (no loss scaling needed)"
        else:
            return "fp16", f"fp16 autocast + loss scaling: sm_{major}x has no native bf16"
    else:
        why = "requested by the recipe"
    if requested == "fp32":
        return "no", "fp32: " + why
    if requested in ("fp16", "bf16") and not cuda:
        raise ValueError(f"train.precision={requested} needs a CUDA device; use fp32 or auto on CPU")
    if requested == "bf16" and major < 8:
        raise ValueError(f"train.precision=bf16 needs sm_80+ (this GPU is sm_{major}x): use fp16")
    return requested, f"{requested}: {why}"


def peak_rss_gb() -> float:
    """Peak resident memory of this process and its children, in GB (whole process tree)."""
    import resource

    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((self_kb + child_kb) / 1024**2, 3)
