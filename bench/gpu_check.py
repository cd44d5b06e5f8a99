"""The GPU performance check (issue 8) in one command: how close training runs to the GPU's speed
of light, and whether the fp16, bf16, decoder and ZeRO paths work, on random-init models.

    bash bench/gpu_check.sh [--dry]                                  # the usual way: writes under $OUT
    python bench/gpu_check.py --out DIR [--dry] [--parts abcde] [--budget-s 360]

Parts, each its own process with its own time limit (a crash, an out-of-memory error or a hang
loses that part alone; what it measured before a kill is kept):
  a  gpu_throughput.py  bf16 training throughput + MFU of a bge-base-shaped encoder, seq 256
  b  gpu_fp16.py        the T4 recipe (fp16 + GradScaler, checkpointing, T=0.02): finite? peak memory
  c  gpu_decoder.py     Llama-1B-shaped bidirectional + LoRA + latent attention + GradCache
  d  gpu_search.py      exact top-100 search, 10k queries x 1M x 768 fp16 vectors
  e  gpu_zero.py        a DeepSpeed ZeRO-2 step, if deepspeed is importable
--dry runs every part at toy sizes on the CPU (tests/test_gpu_check.py does, so `make test`
proves the script works before a GPU is at hand).

Writes DIR/gpu_check.json (rewritten after every part: a killed run still leaves a report) and
DIR/gpu_check.log (every part's output); prints a summary last. Exit status 1 if a part failed
or one of its checks (results.checks: finite losses, memory budgets, MFU goal, exact search) is false.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from embed.io import write_json_atomic  # noqa: E402


@dataclass(frozen=True)
class PartSpec:
    letter: str
    name: str
    script: str
    limit_s: float     # the most it may take on the GPU
    reserve_s: float   # the least it needs: kept free for it while earlier parts run


PARTS = [
    PartSpec("a", "a_bf16_throughput", "gpu_throughput.py", 200, 60),
    PartSpec("b", "b_fp16_t4_recipe", "gpu_fp16.py", 80, 30),
    PartSpec("c", "c_decoder_lora_gradcache", "gpu_decoder.py", 100, 40),
    PartSpec("d", "d_exact_topk_search", "gpu_search.py", 50, 20),
    PartSpec("e", "e_deepspeed_zero2", "gpu_zero.py", 50, 10),
]
DRY_LIMIT_S = 240         # per part on a shared CPU: generous, a dry part normally takes 5-20 s
EXIT_MARGIN_S = 10        # a part is told to finish this much before it is killed
VERSIONED_PACKAGES = ["torch", "transformers", "accelerate", "peft", "sentence-transformers", "numpy",
                      "faiss-cpu", "faiss-gpu-cu12", "deepspeed", "bitsandbytes"]


# ---------------------------------------------------------------- running one part
def run_part(command: list[str], timeout_s: float, log_path: Path, env: dict) -> tuple[int | None, float]:
    """Run `command` in its own process group, its output appended to `log_path`; kill the group at
    `timeout_s` (torch.compile's worker processes included). Returns (exit code or None if killed, seconds)."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return process.wait(timeout=timeout_s), time.monotonic() - start
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None, time.monotonic() - start


def part_entry(returncode: int | None, seconds: float, timeout_s: float, report: dict, output_tail: str) -> dict:
    """The report's record of one part: status ok / partial / skipped / error / timeout, and its results."""
    results = report.get("results", {})
    failed = [key for key, value in results.items() if isinstance(value, dict) and "error" in value]
    entry = {"seconds": round(seconds, 1), "time_limit_s": round(timeout_s), "results": results,
             "failed_checks": [name for name, passed in results.get("checks", {}).items() if passed is False]}
    if returncode is None:
        entry.update(status="timeout", error=f"killed at its time limit of {timeout_s:.0f} s; results so far kept")
    elif returncode != 0:
        entry.update(status="error", error=report.get("error") or f"exit status {returncode}")
    elif "skipped" in report:
        entry.update(status="skipped", skipped=report["skipped"])
    elif failed:
        entry.update(status="partial", failed=failed)
    elif not results:
        entry.update(status="error", error="the part wrote no results")
    else:
        entry["status"] = "ok"
    if entry["status"] in ("timeout", "error", "partial"):
        entry["output_tail"] = output_tail
    return entry


# ---------------------------------------------------------------- what the report says about the machine
def environment(dry: bool) -> dict:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    device = {"type": "cpu", "name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if not dry:
        import torch  # not in a dry run: its parent process needs no torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device = {"type": "cuda", "name": props.name, "capability": f"sm_{props.major}{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count(),
                      "cuda": torch.version.cuda, "driver": _driver_version()}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "versions": versions, "device": device}


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---------------------------------------------------------------- the summary lines
def headline(letter: str, entry: dict) -> str:
    """The figures that matter from one part, in one line."""
    r = entry.get("results", {})

    def get(key: str, field: str):
        value = r.get(key)
        return value.get(field) if isinstance(value, dict) else None

    if letter == "a" and "best" in r:
        best = r["best"]
        line = (f"best {best['variant']}: {best['sequences_per_s']} seq/s, MFU {best['mfu_vs_measured_matmul']:.1%} "
                f"of the measured matmul ({r['matmul_ceiling']['tflops']} TFLOP/s)")
        if best["mfu_vs_datasheet"] is not None:
            line += f", {best['mfu_vs_datasheet']:.1%} of the {r['datasheet_bf16_tflops']:.0f} TFLOP/s datasheet peak"
        return line
    if letter == "b":
        return (f"gradcache: finite={get('gradcache', 'finite')} skipped_steps={get('gradcache', 'steps_skipped_by_scaler')} "
                f"peak={get('gradcache', 'peak_allocated_gb')} GB | checkpointing_only: "
                f"peak={get('checkpointing_only', 'peak_allocated_gb')} GB (budget 14 GB)")
    if letter == "c":
        return (f"bidirectional ok={get('bidirectional', 'all_ok')} | lora: {get('lora', 'steps_per_s')} steps/s, "
                f"peak={get('lora', 'peak_allocated_gb')} GB (budget 14 GB) | qlora: "
                f"{get('qlora', 'skipped') or get('qlora', 'steps_per_s')}")
    if letter == "d":
        return (f"torch: {get('torch', 'queries_per_s')} q/s, recall {get('torch', 'recall_at_k_vs_fp32')} | faiss: "
                f"{get('faiss', 'skipped') or get('faiss', 'queries_per_s')}")
    if letter == "e":
        return f"zero2: losses finite={get('zero2', 'losses_finite')}, peak={get('zero2', 'peak_allocated_gb')} GB"
    return ""


def summary_line(letter: str, entry: dict) -> str:
    if entry.get("error") or entry.get("skipped"):
        return f"{entry['status']}: {entry.get('error') or entry['skipped']}"
    failed = f" | failed: {', '.join(entry['failed'])}" if entry.get("failed") else ""
    if entry.get("failed_checks"):
        failed += f" | CHECKS FAILED: {', '.join(entry['failed_checks'])}"
    try:
        return f"{entry['status']}: {headline(letter, entry)}{failed}"
    except (KeyError, TypeError, ValueError) as e:  # a malformed result must not lose the report
        return f"{entry['status']}: (no summary: {type(e).__name__} {e})"


# ---------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--dry", action="store_true", help="toy sizes on CPU: checks the code, measures nothing")
    parser.add_argument("--parts", default="abcde", help="which parts to run, e.g. 'ad'")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time for all parts together (default 360 on a GPU, 600 dry)")
    args = parser.parse_args()

    # ------------------------------------------------------------ setup
    start = time.monotonic()
    budget = args.budget_s or (600.0 if args.dry else 360.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path, log_path = out / "gpu_check.json", out / "gpu_check.log"
    env = dict(os.environ)
    if args.dry:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    report = {"check": "bench/gpu_check.sh", "mode": "dry" if args.dry else "full", **environment(args.dry),
              "budget_s": budget, "parts": {}}
    if not args.dry and report["device"]["type"] != "cuda":
        print("error: no CUDA device visible; `bash bench/gpu_check.sh --dry` checks the script on CPU", file=sys.stderr)
        return 2
    selected = [spec for spec in PARTS if spec.letter in args.parts]
    log_path.write_text(f"gpu_check {report['mode']} {report['date']} on {report['device']['name']}\n")
    print(f"gpu_check ({report['mode']}) on {report['device']['name']}: parts {''.join(s.letter for s in selected)}, "
          f"budget {budget:.0f} s -> {out}", flush=True)

    # ------------------------------------------------------------ the parts, one process each
    with tempfile.TemporaryDirectory() as scratch:
        for i, spec in enumerate(selected):
            left = budget - (time.monotonic() - start) - sum(s.reserve_s for s in selected[i + 1:])
            timeout = min(DRY_LIMIT_S if args.dry else spec.limit_s, left)
            if timeout < (5 if args.dry else spec.reserve_s):
                report["parts"][spec.name] = {"status": "skipped", "results": {},
                                              "skipped": f"not started: {max(left, 0):.0f} s left of the {budget:.0f} s budget"}
                write_json_atomic(report_path, report)
                continue
            result_path = Path(scratch) / f"{spec.letter}.json"
            command = [sys.executable, str(BENCH / spec.script), "--result", str(result_path),
                       "--seconds", str(max(timeout - (2 if args.dry else EXIT_MARGIN_S), 1))]
            if args.dry:
                command.append("--dry")
            print(f"[{spec.letter}] {spec.name}: up to {timeout:.0f} s ...", flush=True)
            with open(log_path, "a") as log:
                log.write(f"\n===== [{spec.letter}] {spec.name}: {' '.join(command)}\n")
            log_offset = log_path.stat().st_size
            returncode, seconds = run_part(command, timeout, log_path, env)
            with open(log_path, "a") as log:
                log.write(f"===== [{spec.letter}] {spec.name} ({seconds:.1f} s, exit {returncode})\n")
            with open(log_path, "rb") as log:
                log.seek(log_offset)
                output_tail = "\n".join(log.read().decode(errors="replace").splitlines()[-25:])
            part_report = json.loads(result_path.read_text()) if result_path.exists() else {}
            report["parts"][spec.name] = entry = part_entry(returncode, seconds, timeout, part_report, output_tail)
            report["total_seconds"] = round(time.monotonic() - start, 1)
            write_json_atomic(report_path, report)
            print(f"[{spec.letter}] {summary_line(spec.letter, entry)} ({seconds:.0f} s)", flush=True)

    # ------------------------------------------------------------ summary
    report["summary"] = {spec.name: summary_line(spec.letter, report["parts"][spec.name]) for spec in selected}
    report["total_seconds"] = round(time.monotonic() - start, 1)
    write_json_atomic(report_path, report)
    print(f"\n===== summary ({report['total_seconds']:.0f} s; {report_path}) =====")
    for name, line in report["summary"].items():
        print(f"{name:28s} {line}")
    failed = [name for name, entry in report["parts"].items()
              if entry["status"] in ("error", "timeout", "partial") or entry.get("failed_checks")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
