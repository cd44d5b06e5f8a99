"""Contrastive training (InfoNCE, in-batch + hard negatives, staged instruction tuning) on Accelerate.

Usage:
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py \
        recipes/scifact-supervised-cpu.yaml [--train.max_steps 20] [--run_dir runs/smoke]
    accelerate launch --config_file accelerate_configs/a100_bf16.yaml scripts/train.py recipes/bge-base-8xa100.yaml

Rerunning the same command resumes from the last checkpoint in `run_dir/checkpoints`,
exactly (same batches, same RNG, same optimizer state). The model lands in `run_dir/model`
(sentence-transformers layout) and a summary in `run_dir/train_summary.json`.
"""
from __future__ import annotations

import hashlib
import math
import random
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from embed.batching import collate_keys, epoch_batches, make_group, usable_examples
from embed.checkpoints import CheckpointManager
from embed.cli import run_main
from embed.config import ConfigError, parse_recipe, to_dict
from embed.data import DataError, load_corpus, pairs_from_beir, read_train_set, write_json_atomic
from embed.hardware import choose_precision, peak_rss_gb
from embed.lexical import fit_lexical_channel
from embed.loss import InfoNCELoss, ListwiseDistillation, MatryoshkaLoss
from embed.model import load_from_config

MAX_POSITIVES = 8  # positives per query considered for false-negative masking


def load_stage_data(stage, run_dir: str, skipped: Counter):
    """Training examples of one stage: train.jsonl files and/or judged pairs of BEIR folders,
    narrowed to the stage's `sources` (rows from other sources are left out, not skipped)."""
    examples = []
    for entry in stage.data:
        entry = entry.replace("{run_dir}", run_dir)
        if Path(entry).is_dir() or entry.startswith("builtin:"):
            examples += pairs_from_beir(entry, stage.split, skipped=skipped)
        else:
            examples += read_train_set(entry, skipped=skipped)
    if stage.sources:
        examples = [e for e in examples if source_kind(e.source) in stage.sources]
        if not examples:
            raise DataError(f"stage '{stage.name}': no rows of {stage.data} come from sources {stage.sources}")
    return usable_examples(examples, stage.num_negatives, skipped, need_scores=stage.distill_weight > 0)


def source_kind(source: str | None) -> str:
    """'generated', 'cloze', or the part before ':' ('qrels:<path>' -> 'qrels')."""
    return (source or "").split(":", 1)[0]


def optimizer_groups(model, lr: float, weight_decay: float, head_lr: float | None):
    """AdamW groups: no decay on biases/norms; a freshly initialised pooling head gets its own lr."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith("pooling.")
        decay = p.ndim >= 2 and "norm" not in name.lower()
        key = (is_head, decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
             "lr": (head_lr or lr * 10) if is_head else lr} for (is_head, decay), ps in groups.items()]


def freeze_unused_parameters(model) -> int:
    """BERT's pooler head never reaches our embeddings: freeze it so DDP sees no unused grads."""
    n = 0
    for name, p in model.backbone.named_parameters():
        if name.startswith("pooler."):
            p.requires_grad_(False)
            n += 1
    return n


def main():
    # ------------------------------------------------------------------ config
    cfg = parse_recipe("train", description=__doc__)
    tc, run_dir = cfg.train, cfg.run_dir

    # ------------------------------------------------------------------ accelerator (before the model: ZeRO-3 init)
    mixed_precision, why = choose_precision(tc.precision)
    trackers = [t for t in tc.report_to if t]
    # cpu=True without CUDA: lets `accelerate launch --multi_gpu --num_processes 2` (torchrun) run
    # gloo processes on a CPU machine; accelerate's own `--cpu --num_processes N` starts only one
    # process unless MPI is configured.
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=trackers or None,
                              project_dir=str(Path(run_dir) / "logs"), cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    accelerator.print(f"device: {accelerator.device} x {world} process(es) | precision: {why} | "
                      f"attention: {cfg.model.attn_implementation}")

    # ------------------------------------------------------------------ model
    model = load_from_config(cfg.model)
    frozen = freeze_unused_parameters(model)
    if cfg.model.lora.enabled:  # after make_bidirectional (done at load); the pooling head stays fully trainable
        from embed.lora import apply_lora

        model.backbone = apply_lora(model.backbone, r=cfg.model.lora.r, alpha=cfg.model.lora.alpha,
                                    dropout=cfg.model.lora.dropout, target=cfg.model.lora.target)
    if tc.gradient_checkpointing:
        from embed.lora import enable_gradient_checkpointing

        enable_gradient_checkpointing(model.backbone)
    if tc.compile:
        from embed.compile import compile_layers

        accelerator.print(f"compile: {compile_layers(model.backbone)} layers, torch.compile (inductor)")
    if cfg.model.lexical_weight and tc.lexical_aware:  # the dense half trains against the mixed score
        model.lexical = _lexical_channel(cfg, model, accelerator)
    raw_model = model
    accelerator.print(f"model: {cfg.model.name_or_path} | pooling {model.settings.pooling} | "
                      f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable "
                      f"({frozen} unused tensors frozen)")

    # ------------------------------------------------------------------ loss
    loss_fn = ListwiseDistillation(InfoNCELoss(temperature=tc.temperature, in_batch_negatives=True), weight=0.0,
                                   temperature=tc.temperature, teacher_temperature=tc.distill_temperature)
    if cfg.model.matryoshka_dims:
        loss_fn = MatryoshkaLoss(loss_fn, dims=cfg.model.matryoshka_dims)

    # ------------------------------------------------------------------ data (every stage, up front: fail early)
    skipped = Counter()
    stage_examples = [load_stage_data(stage, run_dir, skipped) for stage in cfg.train.stages]
    global_batch = tc.per_device_batch_size * world
    plans = []
    for i, (stage, examples) in enumerate(zip(cfg.train.stages, stage_examples)):
        per_epoch = len(epoch_batches(examples, global_batch, seed=cfg.seed)) if examples else 0
        if per_epoch == 0:
            raise ConfigError(f"stage '{stage.name}': {len(examples)} usable examples cannot fill one global "
                              f"batch of {global_batch} (skipped: {dict(skipped)})")
        steps = math.ceil(per_epoch * stage.epochs)
        if stage.max_steps:
            steps = min(steps, stage.max_steps)
        plans.append((per_epoch, steps))
    if tc.max_steps:  # a global cap (smoke runs) trims the last stages first
        left, capped = tc.max_steps, []
        for per_epoch, steps in plans:
            capped.append((per_epoch, min(steps, left)))
            left -= capped[-1][1]
        plans = capped
    total_steps = sum(s for _, s in plans)
    accelerator.print(f"total train batch size (global): {global_batch} = {tc.per_device_batch_size} per device "
                      f"x {world} | steps: {total_steps} over {len(plans)} stage(s) | skipped: {dict(skipped)}")

    # ------------------------------------------------------------------ tracking + resume
    if trackers:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(to_dict(cfg)).items()}
        accelerator.init_trackers("train", config=flat)
    ckpt = CheckpointManager(Path(run_dir) / "checkpoints", accelerator, keep=tc.save_total_limit,
                             settings=run_settings(cfg))
    resume = ckpt.latest()
    global_step, losses, t_start, samples_seen, loop_seconds = 0, [], time.time(), 0, 0.0
    dev_metrics = {}
    if resume:
        accelerator.print(f"resuming from {resume.path} (stage {resume.stage}, step {resume.step_in_stage})")

    # ------------------------------------------------------------------ stages
    model = accelerator.prepare(model)
    for stage_index, (stage, examples, (per_epoch, steps)) in enumerate(zip(cfg.train.stages, stage_examples, plans)):
        if resume and stage_index < resume.stage:
            global_step += steps
            continue
        if steps == 0:
            continue
        loss_fn_stage = _for_stage(loss_fn, stage)
        groups = optimizer_groups(raw_model, stage.learning_rate, tc.weight_decay,
                                  cfg.model.latent_attention.learning_rate)
        optimizer = torch.optim.AdamW(groups, lr=stage.learning_rate)
        # one optimizer per stage: drop the previous stage's from accelerate's checkpoint registry,
        # so save_state/load_state always see exactly this stage's optimizer and scheduler
        accelerator._optimizers.clear()
        accelerator._schedulers.clear()
        scheduler = get_scheduler(tc.scheduler if tc.scheduler != "constant" else "constant_with_warmup",
                                  optimizer, num_warmup_steps=int(tc.warmup_ratio * steps), num_training_steps=steps)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        step_in_stage = 0
        if resume and stage_index == resume.stage:
            ckpt.load(resume)
            step_in_stage = resume.step_in_stage
            global_step += step_in_stage
            losses = resume.losses
            resume = None
        accelerator.print(f"=== stage {stage_index + 1}/{len(plans)} '{stage.name}': {len(examples)} examples, "
                          f"{steps} steps, lr {stage.learning_rate:.2e}, in-batch negatives "
                          f"{'on' if stage.in_batch_negatives else 'off'}, {stage.num_negatives} hard negative(s)")
        bar = tqdm(total=steps, initial=step_in_stage, desc=stage.name, disable=not accelerator.is_main_process)
        model.train()
        while step_in_stage < steps:
            epoch, batch_in_epoch = _locate(examples, global_batch, cfg.seed, stage_index, step_in_stage)
            batches = epoch_batches(examples, global_batch, seed=_epoch_seed(cfg.seed, stage_index, epoch))
            for batch in batches[batch_in_epoch:]:
                if step_in_stage >= steps:
                    break
                t0 = time.time()
                rng = random.Random(_epoch_seed(cfg.seed, stage_index, epoch) * 1_000_003 + step_in_stage)
                all_groups = [make_group(examples[i], stage.num_negatives, rng) for i in batch]
                local = all_groups[rank * tc.per_device_batch_size:(rank + 1) * tc.per_device_batch_size]
                loss = _train_step(accelerator, model, raw_model, loss_fn_stage, local, stage, tc)
                if tc.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loop_seconds += time.time() - t0
                step_in_stage += 1
                global_step += 1
                samples_seen += global_batch
                losses.append(loss)
                bar.update(1)
                if global_step % tc.logging_steps == 0 or step_in_stage == steps:
                    sps = global_batch / max(time.time() - t0, 1e-9)
                    mem = (torch.cuda.max_memory_allocated() / 1e9) if torch.cuda.is_available() else peak_rss_gb()
                    accelerator.print(f"step {global_step} | loss {loss:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                                      f"samples/s {sps:.1f} | mem {mem:.2f} GB")
                    accelerator.log({"train/loss": loss, "train/lr": scheduler.get_last_lr()[0]}, step=global_step)
                if tc.eval_steps and global_step % tc.eval_steps == 0 and cfg.data.dev:
                    dev_metrics = _dev_eval(accelerator, raw_model, cfg, global_step)
                if (tc.save_steps and step_in_stage % tc.save_steps == 0) or step_in_stage == steps:
                    ckpt.save(stage_index, step_in_stage, global_step, losses)
        bar.close()

    # ------------------------------------------------------------------ final model + summary
    accelerator.wait_for_everyone()
    if cfg.data.dev:
        dev_metrics = _dev_eval(accelerator, raw_model, cfg, global_step)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if cfg.model.lora.enabled:
            from embed.lora import merge_lora

            final.backbone = merge_lora(final.backbone)
        if cfg.model.lexical_weight and final.lexical is None:
            final.lexical = _lexical_channel(cfg, final, accelerator)
        _save_atomically(final, Path(run_dir) / "model")
        elapsed = time.time() - t_start
        summary = {
            "steps": global_step, "global_batch": global_batch, "processes": world, "precision": why,
            "samples_seen_this_run": samples_seen, "wall_seconds": round(elapsed, 1),
            "train_seconds": round(loop_seconds, 1),
            "train_samples_per_second": round(samples_seen / max(loop_seconds, 1e-9), 2),
            "final_loss": losses[-1] if losses else None,
            "mean_loss_last_10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
            "stages": [{"name": s.name, "examples": len(ex), "steps": st} for s, ex, (_, st) in
                       zip(cfg.train.stages, stage_examples, plans)],
            "skipped": dict(skipped), "dev": dev_metrics, "peak_rss_gb": peak_rss_gb(),
            "model": str(Path(run_dir) / "model"),
        }
        write_json_atomic(Path(run_dir) / "train_summary.json", summary)
        accelerator.print(f"saved {Path(run_dir) / 'model'} | {global_step} steps in {elapsed:.0f}s")
    accelerator.end_training()


# ---------------------------------------------------------------------- helpers
def _train_step(accelerator, model, raw_model, loss_fn, groups, stage, tc) -> float:
    """One forward/backward over this process's groups; returns the loss value."""
    queries = [g.query for g in groups]
    docs = [d for g in groups for d in g.docs]
    doc_keys, pos_keys = collate_keys(groups, MAX_POSITIVES)
    q_feat = raw_model.tokenize(queries, kind="query", max_length=stage.query_max_length, prompt=stage.instruction)
    d_feat = raw_model.tokenize(docs, kind="document", max_length=stage.max_length)
    device = accelerator.device
    q_feat = {k: v.to(device) for k, v in q_feat.items()}
    d_feat = {k: v.to(device) for k, v in d_feat.items()}
    doc_keys, pos_keys = doc_keys.to(device), pos_keys.to(device)
    B, G = len(groups), len(groups[0].docs)
    extra = {}
    if stage.distill_weight:  # usable_examples kept only rows with teacher scores
        extra["teacher_scores"] = torch.tensor([g.scores for g in groups], dtype=torch.float32, device=device)
    if tc.gradcache_chunk_size:
        from embed.loss import GradCache

        cache = GradCache(loss_fn, chunk_size=tc.gradcache_chunk_size)
        return float(cache(model, q_feat, d_feat, doc_keys, pos_keys, backward=accelerator.backward,
                           no_sync=lambda: _defer_gradient_sync(accelerator, model), **extra))
    q = model(q_feat)                                   # [B, D]
    d = model(d_feat).view(B, G, -1)                    # [B, G, D]
    loss = loss_fn(q, d, doc_keys, pos_keys, **extra)
    accelerator.backward(loss)
    return loss.item()


@contextmanager
def _defer_gradient_sync(accelerator, model):
    """GradCache's chunks before the last: no gradient all-reduce (DDP) and no optimizer step
    (DeepSpeed's backward steps whenever sync_gradients is set; its no_sync is a no-op)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        previous = accelerator.sync_gradients
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(previous)
    else:
        with accelerator.no_sync(model):
            yield


def _for_stage(loss_fn, stage):
    """The loss chain set to the stage's in-batch negatives and distillation weight."""
    part = loss_fn
    while part is not None:
        if isinstance(part, InfoNCELoss):
            part.in_batch_negatives = stage.in_batch_negatives
        if isinstance(part, ListwiseDistillation):
            part.weight = stage.distill_weight
        part = getattr(part, "base_loss", None)
    return loss_fn


def _epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return seed * 10_007 + stage * 101 + epoch


def _locate(examples, global_batch: int, seed: int, stage: int, step: int) -> tuple[int, int]:
    """(epoch, batch index) of a stage's `step`; epochs may differ by a batch (duplicates deferred)."""
    epoch = 0
    while True:
        n = len(epoch_batches(examples, global_batch, seed=_epoch_seed(seed, stage, epoch)))
        if step < n:
            return epoch, step
        step -= n
        epoch += 1


def _dev_eval(accelerator, raw_model, cfg, step) -> dict:
    metrics = {}
    if accelerator.is_main_process:
        from embed.evaluation import evaluate_beir

        metrics = evaluate_beir(raw_model, cfg.data.dev, split=cfg.data.dev_split, batch_size=cfg.eval.batch_size)
        accelerator.print(f"dev @ step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                            if isinstance(v, float) and "10" in k))
        accelerator.log({f"dev/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    accelerator.wait_for_everyone()
    return metrics


def run_settings(cfg) -> dict:
    """What shapes the training trajectory, flattened: model and training keys (not logging or
    checkpoint cadence), seed, the corpus, and the content of every stage's data."""
    cadence = {"save_steps", "save_total_limit", "eval_steps", "logging_steps", "report_to", "dataloader_workers", "max_steps"}
    settings = {f"model.{k}": v for k, v in _flatten(to_dict(cfg.model)).items()}
    settings.update({f"train.{k}": v for k, v in _flatten(to_dict(cfg.train)).items() if k not in cadence})
    settings.update({"seed": cfg.seed, "data.corpus": cfg.data.corpus})
    for i, stage in enumerate(cfg.train.stages):
        for j, entry in enumerate(stage.data):
            path = Path(entry.replace("{run_dir}", cfg.run_dir))
            if path.is_dir():
                path = path / "qrels" / f"{stage.split}.tsv"
            if path.is_file():
                settings[f"train.stages.{i}.data.{j}.sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return settings


def _lexical_channel(cfg, model, accelerator):
    """embed.lexical's channel for `model`, IDF over data.corpus (fitted on every process: seconds)."""
    corpus = load_corpus(cfg.data.corpus)
    channel = fit_lexical_channel(model, [corpus.doc_text(i) for i in range(len(corpus))],
                                  cfg.model.lexical_dim, cfg.model.lexical_weight, seed=cfg.seed)
    accelerator.print(f"lexical channel: IDF over {len(corpus)} documents of {cfg.data.corpus}, "
                      f"{cfg.model.lexical_dim} buckets, weight {cfg.model.lexical_weight}")
    return channel


def _save_atomically(model, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    run_main(main)
