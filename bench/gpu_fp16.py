"""(b) The T4 recipe's numerics and memory on a bge-base-shaped encoder: fp16 autocast with a
GradScaler over fp32 master weights, sdpa attention, gradient checkpointing, InfoNCE at
temperature 0.02 (FIELD.md, "Precision and hardware").

The step is train.py's: the forward runs under fp16 autocast and returns fp32 embeddings (what
accelerate's fp16 mode does to `model.forward`), the loss is scaled before each backward,
gradients are unscaled and clipped to norm 1 before the scaler's step. Global batch 128 queries,
each with 1 positive and 1 hard negative, every sequence 256 tokens. Two runs on fresh models:
  gradcache           embed.training.loss.GradCache in chunks of 32 sequences + checkpointing, N steps on
                      one fixed batch: every loss finite; the unscaled gradients finite on every
                      step the scaler applied (it skips, and halves its scale, on an overflow);
                      the loss trajectory; peak allocated memory;
  checkpointing_only  the whole batch in one graph + checkpointing, 2 steps: peak allocated memory.
A T4 (16 GB) user's budget is 14 GB of peak allocated memory.

    python bench/gpu_fp16.py --result b.json --seconds 80 [--dry]    # normally via gpu_check.sh
"""
from __future__ import annotations

import math
import statistics
import time

import torch
from gpu_common import (
    BGE_BASE,
    TINY_BERT,
    Part,
    adamw,
    all_finite,
    autocast,
    contrastive_batch,
    part_main,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from gpu_throughput import bert_embedding_model

FULL = dict(shape=BGE_BASE, queries=128, group=2, seq=256, chunk=32, steps=20)
DRY = dict(shape=TINY_BERT, queries=8, group=2, seq=32, chunk=4, steps=4)
T4_BUDGET_GB = 14.0
TEMPERATURE = 0.02


def fp16_steps(part: Part, sizes: dict, gradcache: bool, steps: int) -> dict:
    from embed.modeling.model import enable_gradient_checkpointing
    from embed.training.loss import GradCache, InfoNCELoss

    device, shape, queries, group = part.device, sizes["shape"], sizes["queries"], sizes["group"]
    model = bert_embedding_model(shape, device, torch.float32)
    enable_gradient_checkpointing(model.backbone)
    loss_fn = InfoNCELoss(temperature=TEMPERATURE)
    query_features, doc_features, doc_keys, query_pos_keys = contrastive_batch(
        queries, group, sizes["seq"], sizes["seq"], shape["vocab_size"], device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=5e-5, device=device)
    scaler = torch.amp.GradScaler(device.type)
    cache = GradCache(loss_fn, chunk_size=sizes["chunk"])

    def encode(features):
        with autocast(device, torch.float16):
            return model(features).float()

    def scaled_backward(loss):
        scaler.scale(loss).backward()

    def loss_and_backward() -> torch.Tensor:
        if gradcache:
            return cache(encode, query_features, doc_features, doc_keys, query_pos_keys, backward=scaled_backward)
        loss = loss_fn(encode(query_features), encode(doc_features).view(queries, group, -1), doc_keys, query_pos_keys)
        scaled_backward(loss)
        return loss.detach()

    losses, grads_finite, applied, grad_norms, scales, seconds = [], [], [], [], [], []
    reset_peak_memory(device)
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        loss = loss_and_backward()
        scaler.unscale_(optimizer)
        grads_finite.append(bool(torch.stack([p.grad.isfinite().all() for p in params if p.grad is not None]).all()))
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied.append(scaler.get_scale() >= scale)  # the scaler lowers its scale exactly when it skips
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        scales.append(scale)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    memory = peak_memory(device)
    result = {
        "steps": steps, "losses": [round(x, 4) for x in losses], "loss_scales": scales,
        "grad_norms_unscaled": [round(x, 4) if math.isfinite(x) else repr(x) for x in grad_norms],
        "losses_finite": all_finite(losses),
        "grads_finite_on_applied_steps": all(ok for ok, used in zip(grads_finite, applied) if used),
        "steps_skipped_by_scaler": applied.count(False),
        "loss_decreased": losses[-1] < losses[0],
        "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 4),
        "settings": {"queries": queries, "documents_per_query": group, "sequence_length": sizes["seq"],
                     "sequences_per_step": queries * (1 + group), "gradcache_chunk": sizes["chunk"] if gradcache else None,
                     "gradient_checkpointing": True, "precision": "fp16 autocast + GradScaler, fp32 weights",
                     "attention": "sdpa", "temperature": TEMPERATURE, "optimizer": "AdamW lr 5e-5, clip 1.0",
                     "batch": "one fixed random batch, repeated"},
        **memory}
    if memory:
        result["within_t4_budget_14gb"] = memory["peak_allocated_gb"] <= T4_BUDGET_GB
    result["finite"] = result["losses_finite"] and result["grads_finite_on_applied_steps"] \
        and result["steps_skipped_by_scaler"] < steps
    return result


def run(part: Part) -> None:
    sizes = DRY if part.dry else FULL
    part.attempt("gradcache", lambda: fp16_steps(part, sizes, gradcache=True, steps=sizes["steps"]),
                 needs_seconds=0 if part.dry else 20)
    part.attempt("checkpointing_only", lambda: fp16_steps(part, sizes, gradcache=False, steps=2),
                 needs_seconds=0 if part.dry else 10)
    part.put("budget_gb", T4_BUDGET_GB)
    for run_name in ("gradcache", "checkpointing_only"):
        part.check(f"{run_name}_finite", part.field(run_name, "finite"))
        part.check(f"{run_name}_within_14gb", part.field(run_name, "within_t4_budget_14gb"))


if __name__ == "__main__":
    part_main(run, __doc__.splitlines()[0])
