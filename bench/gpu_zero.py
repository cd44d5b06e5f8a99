"""(e) DeepSpeed ZeRO-2 training steps through accelerate, when deepspeed is importable.

One process (world size 1), accelerate's DeepSpeedPlugin (ZeRO stage 2, gradient clipping 1.0)
with bf16 mixed precision, the bge-base-shaped EmbeddingModel, InfoNCE (temperature 0.02) on 32
queries + 32 documents of 256 tokens, AdamW; a few steps: losses finite, seconds per step, peak
memory. Skipped, with the reason, when deepspeed is not importable (the lent GPU machines do not
have it).

    python bench/gpu_zero.py --result e.json --seconds 60 [--dry]    # normally via gpu_check.sh
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import time

import torch
from gpu_common import (
    BGE_BASE,
    TINY_BERT,
    Part,
    all_finite,
    contrastive_batch,
    part_main,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from gpu_throughput import bert_embedding_model

FULL = dict(shape=BGE_BASE, queries=32, seq=256, steps=4)
DRY = dict(shape=TINY_BERT, queries=4, seq=32, steps=2)


def zero2_steps(part: Part, sizes: dict) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from embed.training.loss import InfoNCELoss

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)  # a one-process "launch" without the launcher
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_clipping=1.0)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = sizes["queries"]
    accelerator = Accelerator(mixed_precision="bf16", deepspeed_plugin=plugin)
    device, queries = accelerator.device, sizes["queries"]
    model = bert_embedding_model(sizes["shape"], device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = InfoNCELoss(temperature=0.02)
    query_features, doc_features, doc_keys, query_pos_keys = contrastive_batch(
        queries, 1, sizes["seq"], sizes["seq"], sizes["shape"]["vocab_size"], device)
    losses, seconds = [], []
    reset_peak_memory(device)
    for _ in range(sizes["steps"]):
        synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(model(query_features), model(doc_features).view(queries, 1, -1), doc_keys, query_pos_keys)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    return {"losses": [round(x, 4) for x in losses], "losses_finite": all_finite(losses),
            "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 4),
            "settings": {"zero_stage": 2, "mixed_precision": "bf16", "processes": 1, "queries": queries,
                         "sequence_length": sizes["seq"], "gradient_clipping": 1.0},
            **peak_memory(device)}


def run(part: Part) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        part.skip("deepspeed is not importable here")
        return
    part.attempt("zero2", lambda: zero2_steps(part, DRY if part.dry else FULL))
    part.check("zero2_losses_finite", part.field("zero2", "losses_finite"))


if __name__ == "__main__":
    part_main(run, __doc__.splitlines()[0])
