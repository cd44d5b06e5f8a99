"""What every part of bench/gpu_check.py shares: the part protocol, the model shapes, random
batches, and timing and memory helpers.

The part protocol: bench/gpu_check.py starts each part as its own process
(`python bench/gpu_<part>.py --result FILE --seconds N [--dry]`), so a crash, an out-of-memory
error or a hang loses that part alone, and GPU memory and peak statistics start clean. A part
writes its results to FILE as each measurement completes: when the orchestrator kills it at its
time limit, what it finished is kept.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `embed` without installation, as on the bare GPU machine

import torch  # noqa: E402

from embed.io import write_json_atomic  # noqa: E402

# ---------------------------------------------------------------- shapes (random init: no weights travel)
BGE_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=512)
TINY_BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=512)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=512)
FIRST_REGULAR_TOKEN = 5  # ids 0-4 are special ([PAD], [UNK], [CLS], [SEP], [MASK]) in a BERT vocabulary

GB = 1e9  # budgets are stated in GB (10^9 bytes): "<= 14 GB" on a 16 GB T4


class Part:
    """One part's run: its device, its deadline, and its result file (rewritten at every `put`)."""

    def __init__(self, result_path: str, seconds: float, dry: bool):
        self.result_path, self.dry = result_path, dry
        self.deadline = time.monotonic() + seconds
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.report: dict = {"results": {}}

    def put(self, key: str, value) -> None:
        self.report["results"][key] = value
        write_json_atomic(self.result_path, self.report)

    def skip(self, reason: str) -> None:
        """The whole part cannot run here (a missing package, no GPU support): said, not hidden."""
        self.report["skipped"] = reason
        write_json_atomic(self.result_path, self.report)

    def field(self, key: str, name: str):
        """results[key][name], or None when that measurement failed or did not run."""
        value = self.report["results"].get(key)
        return value.get(name) if isinstance(value, dict) else None

    def check(self, name: str, passed: bool | None) -> None:
        """A pass/fail criterion of this part; None: not measurable here (GPU memory on a CPU run)."""
        self.report["results"].setdefault("checks", {})[name] = passed
        write_json_atomic(self.result_path, self.report)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def attempt(self, key: str, measure: Callable[[], dict], needs_seconds: float = 0.0) -> None:
        """Run one measurement and record its result, or its error, or why it did not start:
        one failing variant must not lose the others."""
        if self.seconds_left() < needs_seconds:
            self.put(key, {"skipped": f"not started: {self.seconds_left():.0f} s left of this part's time, "
                                      f"it needs about {needs_seconds:.0f} s"})
            return
        try:
            self.put(key, measure())
        except Exception as e:  # recorded in the report; the traceback goes to the log
            traceback.print_exc()
            self.put(key, {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
        finally:
            free_memory(self.device)


def part_main(run: Callable[[Part], None], description: str) -> None:
    """Command line of a part: parse, run, and turn an unexpected failure into a recorded error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--result", required=True, help="JSON file this part writes its results to")
    parser.add_argument("--seconds", type=float, required=True, help="time this part may use")
    parser.add_argument("--dry", action="store_true", help="toy sizes on CPU: checks the code, measures nothing")
    args = parser.parse_args()
    if args.dry:
        torch.set_num_threads(1)  # a shared CPU machine
    part = Part(args.result, args.seconds, args.dry)
    try:
        run(part)
    except Exception as e:
        traceback.print_exc()
        part.report["error"] = f"{type(e).__name__}: {e}"
        write_json_atomic(args.result, part.report)
        sys.exit(1)


# ---------------------------------------------------------------- batches
def random_features(rows: int, length: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids without padding: every sequence is `length` real tokens, as documents cut at max_length are."""
    ids = torch.randint(FIRST_REGULAR_TOKEN, vocab, (rows, length), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def contrastive_batch(queries: int, group: int, query_len: int, doc_len: int, vocab: int, device: torch.device):
    """(query features [B], doc features [B*G] query-major, doc_keys [B, G], query_pos_keys [B, 0]):
    the inputs of embed.training.loss.InfoNCELoss / GradCache, every document distinct."""
    query_features = random_features(queries, query_len, vocab, device)
    doc_features = random_features(queries * group, doc_len, vocab, device)
    doc_keys = torch.arange(queries * group, device=device).view(queries, group)
    query_pos_keys = torch.full((queries, 0), -1, dtype=torch.long, device=device)
    return query_features, doc_features, doc_keys, query_pos_keys


# ---------------------------------------------------------------- timing and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, windows: int,
               steps_per_window: int) -> dict:
    """Seconds per step: `warmup` untimed steps (kernel selection, compilation), then `windows`
    timed windows of `steps_per_window` steps, synchronised at both ends; the median window.
    `step` returns its loss (detached); the losses are read after timing, not inside it."""
    start = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    per_step = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        losses += [step() for _ in range(steps_per_window)]
        synchronize(device)
        per_step.append((time.perf_counter() - start) / steps_per_window)
    return {"warmup_steps": warmup, "warmup_seconds": round(warmup_seconds, 2),
            "timed_steps": windows * steps_per_window,
            "seconds_per_step": statistics.median(per_step),
            "seconds_per_step_windows": [round(s, 5) for s in per_step],
            "losses": [round(float(x), 4) for x in losses]}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak allocated GPU memory since the last reset (what a T4 user's budget is about); {} on CPU."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_allocated_gb": round(peak / GB, 2), "peak_allocated_gib": round(peak / 2**30, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 2)}


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def adamw(params, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA (foreach on CPU)."""
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
