"""Peak memory of one training step on the CPU, with and without gradient checkpointing.

The zero-label SciFact recipe trains the bundled all-MiniLM-L6-v2 on 32 queries (64 tokens) against
64 documents (256 tokens) a step. On a CPU without native bf16 the step runs in fp32, and with
dropout on, sdpa takes its unfused path, which keeps every layer's attention scores, softmax and
dropout mask for the backward pass: most of the process's memory. `train.gradient_checkpointing`
recomputes them during the backward pass instead. Each variant runs in a fresh process (peak RSS is
per process) for a few steps on random token ids of those shapes, in the order given, and prints one
JSON object: peak RSS, RSS after the first forward, and seconds per step.

    python bench/bench_memory.py [--steps 3] [--variants plain checkpointing]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def batch(rows: int, length: int) -> dict:
    """Random token ids, no padding: the recipe's documents fill their 256 tokens."""
    import torch

    return {"input_ids": torch.randint(1000, 20000, (rows, length)),
            "attention_mask": torch.ones(rows, length, dtype=torch.long)}


def child(variant: str, steps: int) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(REPO))
    from embed.modeling.model import EmbeddingModel, enable_gradient_checkpointing
    from embed.runtime import resolve_model

    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(resolve_model("minilm"), max_length=256, query_max_length=64)
    if variant == "checkpointing":
        enable_gradient_checkpointing(model.backbone)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    process = psutil.Process()
    out = {"variant": variant, "rss_loaded_gib": round(process.memory_info().rss / 2**30, 3), "step_seconds": []}
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        queries, documents = model(batch(32, 64)), model(batch(64, 256))
        if step == 0:
            out["rss_after_first_forward_gib"] = round(process.memory_info().rss / 2**30, 3)
        scores = queries @ documents.T / 0.05
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(32) * 2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["step_seconds"].append(round(time.perf_counter() - start, 1))
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["plain", "checkpointing"],
                        choices=["plain", "checkpointing"])
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(args._child, args.steps)))
        return
    import torch

    runs = []
    for variant in args.variants:
        done = subprocess.run([sys.executable, __file__, "--_child", variant, "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "bench_memory", "precision": "fp32", "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "shape": "32 x 64 + 64 x 256 tokens",
                      "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
