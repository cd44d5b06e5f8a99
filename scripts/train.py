"""Contrastive training (InfoNCE, in-batch + hard negatives, staged instruction tuning) on Accelerate.

Usage:
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py \
        recipes/scifact-supervised-cpu.yaml [--train.max_steps 20] [--run_dir runs/smoke]
    accelerate launch --config_file accelerate_configs/a100_bf16.yaml scripts/train.py recipes/bge-base-8xa100.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml scripts/train.py RECIPE.yaml

Rerunning the same command resumes from the last checkpoint in `run_dir/checkpoints`,
exactly (same batches, same RNG, same optimizer state); a rerun under settings that shape the
weights differently (steps, schedule, data, stages, model) is refused with the keys that changed.
The model lands in `run_dir/model` (sentence-transformers layout), a summary in
`run_dir/train_summary.json`; the checkpoints are removed once the model is saved.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from embed.cli import run_main
from embed.config import parse_recipe, to_dict
from embed.errors import ConfigError
from embed.io import replace_dir_atomically, write_json_atomic
from embed.modeling.model import load_from_config
from embed.runtime import (
    choose_precision,
    on_terminal,
    peak_rss_gb,
    quiet_progress_off_terminal,
)
from embed.training.batching import collate_keys
from embed.training.checkpoints import CheckpointManager, settings_mismatch
from embed.training.loss import GradCache
from embed.training.stages import (
    MAX_POSITIVES,
    channel_weight,
    flatten,
    freeze_unused_parameters,
    lexical_channel,
    load_stage_data,
    optimizer_groups,
    plan_stages,
    run_settings,
    stage_batches,
    stage_loss,
)


def main():
    # ------------------------------------------------------------------ config
    cfg = parse_recipe("train", description=__doc__)
    quiet_progress_off_terminal()
    tc, run_dir = cfg.train, Path(cfg.run_dir)
    settings = run_settings(cfg)

    # ------------------------------------------------------------------ accelerator (before the model: ZeRO-3 init)
    mixed_precision, why = choose_precision(tc.precision)
    trackers = [t for t in tc.report_to if t]
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # DeepSpeed (imported by accelerate when installed) would warn on every run that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # On a CPU machine: cpu=True lets `accelerate launch --multi_gpu --num_processes 2` (torchrun) run
    # gloo processes (accelerate's own `--cpu --num_processes N` starts one process without MPI);
    # DeepSpeed instead needs cpu=False and the backend named, or every rank believes it is rank 0.
    # The scheduler is stepped once per optimizer step (accelerate would step it once per process).
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=trackers or None,
                              project_dir=str(run_dir / "logs"), cpu=on_cpu and not deepspeed,
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed and on_cpu else [])
    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    accelerator.print(f"device: {accelerator.device} x {world} process(es) | precision: {why} | "
                      f"attention: {cfg.model.attn_implementation}")
    if _already_trained(run_dir, settings):
        accelerator.print(f"{run_dir / 'model'} is already trained with these settings: nothing to do "
                          f"(remove it to train again)")
        return

    # ------------------------------------------------------------------ model
    raw_model = load_from_config(cfg.model)
    frozen = freeze_unused_parameters(raw_model)
    if cfg.model.lora.enabled:  # after make_bidirectional (done at load); the pooling head stays fully trainable
        from embed.modeling.peft import apply_lora

        raw_model.backbone = apply_lora(raw_model.backbone, r=cfg.model.lora.r, alpha=cfg.model.lora.alpha,
                                        dropout=cfg.model.lora.dropout, target=cfg.model.lora.target)
    if tc.gradient_checkpointing:
        from embed.modeling.model import enable_gradient_checkpointing

        enable_gradient_checkpointing(raw_model.backbone)
    if tc.compile:
        from embed.modeling.compile import compile_layers

        accelerator.print(f"compile: {compile_layers(raw_model.backbone)} layers, torch.compile (inductor)")
    lexical, lexical_note = None, ""
    weight, weight_source = channel_weight(cfg)
    if weight:  # fitted now (a corpus problem stops the run before training)
        lexical, n_docs = lexical_channel(cfg, raw_model, weight)
        lexical_note = (f"lexical channel: {cfg.model.lexical_scheme} fitted on {n_docs} documents of {cfg.data.corpus}, "
                        f"{cfg.model.lexical_dim} buckets, weight {weight} ({weight_source})")
        if tc.lexical_aware:  # the dense half trains against the mixed score
            raw_model.lexical = lexical
            accelerator.print(f"{lexical_note}, attached before training")
    elif cfg.model.lexical_weight_rule == "generated":
        accelerator.print(f"lexical channel: none ({weight_source})")
    # ds_numel: the full size of a parameter that ZeRO-3 partitioned at load (its local tensor is a shard)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in raw_model.parameters() if p.requires_grad)
    accelerator.print(f"model: {cfg.model.name_or_path} | pooling {raw_model.settings.pooling} | "
                      f"{trainable / 1e6:.1f}M trainable "
                      f"({frozen} unused tensors frozen)")

    # ------------------------------------------------------------------ data (every stage, up front: fail early)
    skipped = Counter()
    stage_examples = [load_stage_data(stage, str(run_dir), skipped) for stage in tc.stages]
    global_batch = tc.per_device_batch_size * world
    plans = plan_stages(tc.stages, stage_examples, global_batch, cfg.seed, tc.max_steps, skipped)
    total_steps = sum(p.steps for p in plans)
    accelerator.print(f"total train batch size (global): {global_batch} = {tc.per_device_batch_size} per device "
                      f"x {world} | steps: {total_steps} over {len(plans)} stage(s) | skipped: {dict(skipped)}")
    frozen_corpus, frozen_lexical, corpus_rows = None, None, {}
    if any(stage.frozen_documents for stage in tc.stages):
        if deepspeed:
            raise ConfigError("key 'train.stages.*.frozen_documents' is not supported under DeepSpeed (each process "
                              "encodes its share of the corpus before training, which ZeRO-3's sharded forward cannot)")
        from embed.training.frozen_corpus import (
            check_candidates,
            frozen_corpus_embeddings,
        )

        raw_model.to(accelerator.device)
        frozen_corpus, frozen_lexical, corpus_rows, note = frozen_corpus_embeddings(
            cfg, raw_model, accelerator.device, rank, world, accelerator.wait_for_everyone, accelerator.print)
        accelerator.print(note)
        for plan in plans:
            if plan.stage.frozen_documents:
                check_candidates(plan.examples, corpus_rows, plan.stage, cfg.data.corpus)

    # ------------------------------------------------------------------ tracking + resume
    if trackers:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(to_dict(cfg)).items()}
        accelerator.init_trackers("train", config=flat)
    ckpt = CheckpointManager(run_dir / "checkpoints", accelerator, keep=tc.save_total_limit, settings=settings)
    resume = ckpt.latest()
    if resume:
        accelerator.print(f"resuming from {resume.path} (stage {resume.stage}, step {resume.step_in_stage})")
    global_step, losses, t_start, samples_seen, loop_seconds = 0, [], time.time(), 0, 0.0
    dev_metrics = {}

    # ------------------------------------------------------------------ stages: a fresh optimizer, scheduler and loss each
    for plan in plans:
        stage = plan.stage
        if (resume and plan.index < resume.stage) or plan.steps == 0:
            global_step += plan.steps
            continue
        accelerator.free_memory()  # forget the previous stage's model wrapper, optimizer and scheduler
        optimizer = torch.optim.AdamW(optimizer_groups(raw_model, stage.learning_rate, tc.weight_decay,
                                                       cfg.model.latent_attention.learning_rate), lr=stage.learning_rate)
        scheduler = get_scheduler(tc.scheduler if tc.scheduler != "constant" else "constant_with_warmup", optimizer,
                                  num_warmup_steps=int(tc.warmup_ratio * plan.steps), num_training_steps=plan.steps)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no DataLoader tells DeepSpeed these
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = tc.per_device_batch_size
            ds_config["gradient_clipping"] = tc.max_grad_norm  # DeepSpeed clips inside its step
        model, optimizer, scheduler = accelerator.prepare(raw_model, optimizer, scheduler)
        loss_fn = stage_loss(stage, tc.temperature, tc.distill_temperature, cfg.model.matryoshka_dims,
                             (frozen_corpus, frozen_lexical))
        step_in_stage = 0
        if resume and plan.index == resume.stage:
            ckpt.load(resume)
            step_in_stage, losses = resume.step_in_stage, resume.losses
            global_step += step_in_stage
            resume = None
        accelerator.print(f"=== stage {plan.index + 1}/{len(plans)} '{stage.name}': {len(plan.examples)} examples, "
                          f"{plan.steps} steps, lr {stage.learning_rate:.2e}, " + (
                              "documents frozen, the teacher's candidates as targets" if stage.frozen_documents else
                              f"in-batch negatives {'on' if stage.in_batch_negatives else 'off'}, "
                              f"{stage.num_negatives} hard negative(s)"))
        bar = tqdm(total=plan.steps, initial=step_in_stage, desc=stage.name, disable=not accelerator.is_main_process or not on_terminal())
        model.train()
        for groups in stage_batches(plan, global_batch, cfg.seed, start=step_in_stage):
            t0 = time.time()
            local = groups[rank * tc.per_device_batch_size:(rank + 1) * tc.per_device_batch_size]
            if stage.frozen_documents:
                loss = _frozen_documents_step(accelerator, model, raw_model, loss_fn, local, stage, corpus_rows)
            else:
                loss = _train_step(accelerator, model, raw_model, loss_fn, local, stage, tc.gradcache_chunk_size)
            if tc.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses (after scheduler.step: the next one's)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop_seconds += time.time() - t0
            step_in_stage += 1
            global_step += 1
            samples_seen += global_batch
            losses.append(loss)
            bar.update(1)
            if global_step % tc.logging_steps == 0 or step_in_stage == plan.steps:
                sps = global_batch / max(time.time() - t0, 1e-9)
                mem = (torch.cuda.max_memory_allocated() / 1e9) if torch.cuda.is_available() else peak_rss_gb()
                accelerator.print(f"step {global_step} | loss {loss:.4f} | lr {lr:.2e} | "
                                  f"samples/s {sps:.1f} | mem {mem:.2f} GB")
                accelerator.log({"train/loss": loss, "train/lr": lr}, step=global_step)
            if tc.eval_steps and global_step % tc.eval_steps == 0 and cfg.data.dev:
                dev_metrics = _dev_eval(accelerator, raw_model, cfg, global_step)
            if (tc.save_steps and step_in_stage % tc.save_steps == 0) or step_in_stage == plan.steps:
                ckpt.save(plan.index, step_in_stage, global_step, losses)
        bar.close()

    # ------------------------------------------------------------------ final model + summary
    accelerator.wait_for_everyone()
    if cfg.data.dev:
        dev_metrics = _dev_eval(accelerator, raw_model, cfg, global_step)
    with _whole_parameters(accelerator, raw_model):  # every rank: a collective under ZeRO-3
        if accelerator.is_main_process:
            if cfg.model.lora.enabled:
                from embed.modeling.peft import merge_lora

                raw_model.backbone = merge_lora(raw_model.backbone)
            if lexical is not None and not tc.lexical_aware:
                raw_model.lexical = lexical
                accelerator.print(f"{lexical_note}, attached to the trained model")
            replace_dir_atomically(run_dir / "model", raw_model.save_pretrained)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        elapsed = time.time() - t_start
        summary = {
            "steps": global_step, "global_batch": global_batch, "processes": world, "precision": why,
            "samples_seen_this_run": samples_seen, "wall_seconds": round(elapsed, 1),
            "train_seconds": round(loop_seconds, 1),
            "train_samples_per_second": round(samples_seen / max(loop_seconds, 1e-9), 2),
            "final_loss": losses[-1] if losses else None,
            "mean_loss_last_10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
            "stages": [{"name": p.stage.name, "examples": len(p.examples), "steps": p.steps} for p in plans],
            "skipped": dict(skipped), "dev": dev_metrics, "peak_rss_gb": peak_rss_gb(),
            "model": str(run_dir / "model"),
            "checkpoints": f"{run_dir / 'checkpoints'} removed after the final save (kept while a run is unfinished)",
            "settings": settings, "lexical_channel": {"weight": weight, "source": weight_source},
        }
        write_json_atomic(run_dir / "train_summary.json", summary)
    ckpt.remove_all()  # the saved model and summary replace them; an unfinished run keeps them to resume
    if accelerator.is_main_process:
        accelerator.print(f"saved {run_dir / 'model'} | {global_step} steps in {elapsed:.0f}s | checkpoints removed")
    accelerator.end_training()


# ---------------------------------------------------------------------- helpers
def _train_step(accelerator, model, raw_model, loss_fn, groups, stage, gradcache_chunk_size: int) -> float:
    """One forward/backward over this process's groups; returns the loss averaged over processes."""
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
    if gradcache_chunk_size:
        backward, no_sync = _gradcache_sync(accelerator, model)
        loss = GradCache(loss_fn, chunk_size=gradcache_chunk_size)(model, q_feat, d_feat, doc_keys, pos_keys,
                                                                   backward=backward, no_sync=no_sync, **extra)
    else:
        q = model(q_feat)                                   # [B, D]
        d = model(d_feat).view(B, G, -1)                    # [B, G, D]
        loss = loss_fn(q, d, doc_keys, pos_keys, **extra)
        accelerator.backward(loss)
    return accelerator.reduce(loss.detach(), "mean").item()


def _frozen_documents_step(accelerator, model, raw_model, loss_fn, groups, stage, corpus_rows: dict) -> float:
    """One forward/backward over this process's queries alone (embed.training.frozen_corpus)."""
    q_feat = raw_model.tokenize([g.query for g in groups], kind="query", max_length=stage.query_max_length,
                                prompt=stage.instruction)
    width = max(len(g.cand_ids) for g in groups)
    rows = torch.full((len(groups), width), -1, dtype=torch.long)
    scores = torch.zeros((len(groups), width), dtype=torch.float32)
    for i, g in enumerate(groups):
        rows[i, :len(g.cand_ids)] = torch.tensor([corpus_rows[d] for d in g.cand_ids])
        scores[i, :len(g.cand_scores)] = torch.tensor(g.cand_scores)
    device = accelerator.device
    q = model({k: v.to(device) for k, v in q_feat.items()})
    loss = loss_fn(q, rows.to(device), scores.to(device))
    accelerator.backward(loss)
    return accelerator.reduce(loss.detach(), "mean").item()


def _gradcache_sync(accelerator, model):
    """(backward, no_sync) for GradCache, whose chunks before the last must only accumulate
    gradients. DDP: accelerate's no_sync skips the all-reduce. DeepSpeed: its engine reduces and
    steps inside backward, so those chunks go straight to the engine with the gradient
    accumulation boundary unset; the last chunk takes accelerator.backward (boundary set, step)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.backward, lambda: accelerator.no_sync(model)
    deferred = []

    @contextmanager
    def no_sync():
        deferred.append(True)
        try:
            yield
        finally:
            deferred.pop()

    def backward(loss):
        if deferred:
            model.set_gradient_accumulation_boundary(False)
            model.backward(loss)
        else:
            accelerator.backward(loss)
    return backward, no_sync


def _whole_parameters(accelerator, model):
    """ZeRO-3 partitions every parameter over the ranks: saving needs them whole, gathered on
    every rank (DeepSpeed's GatheredParameters) while the main process writes them."""
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _dev_eval(accelerator, raw_model, cfg, step) -> dict:
    """Dev metrics, computed on every rank (under ZeRO-3 each forward is a collective); logged once."""
    from embed.evaluation.mteb_eval import evaluate_beir

    metrics = evaluate_beir(raw_model, cfg.data.dev, split=cfg.data.dev_split, batch_size=cfg.eval.batch_size)
    accelerator.print(f"dev @ step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                        if isinstance(v, float) and "10" in k))
    accelerator.log({f"dev/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    accelerator.wait_for_everyone()
    return metrics


def _already_trained(run_dir: Path, settings: dict) -> bool:
    """True when run_dir/model was trained under these settings; a model of other settings is
    never replaced silently (one-line error naming what changed)."""
    summary = run_dir / "train_summary.json"
    if not ((run_dir / "model").is_dir() and summary.is_file()):
        return False
    stored = json.loads(summary.read_text()).get("settings")
    if stored is None:  # written before the summary kept its settings
        return False
    error = settings_mismatch(str(run_dir / "model"), stored, settings,
                              f"training again would replace it; remove {run_dir / 'model'} or use another run_dir")
    if error:
        raise error
    return True


if __name__ == "__main__":
    run_main(main)
