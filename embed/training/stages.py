"""What a training run is made of, stage by stage: the data, the step plan, the batches of each
step, the loss, the optimizer groups, the lexical channel, and the fingerprint a checkpoint is
checked against. scripts/train.py runs the accelerate loop over these; nothing here touches the
Accelerator, so every piece runs (and is tested) without a process group.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from embed import datasets
from embed.config import to_dict
from embed.data import (
    TrainExample,
    load_corpus,
    pairs_from_beir,
    read_train_set,
    source_kind,
)
from embed.errors import ConfigError, DataError
from embed.training.batching import Group, epoch_batches, make_group, usable_examples
from embed.training.loss import InfoNCELoss, ListwiseDistillation, MatryoshkaLoss

MAX_POSITIVES = 8  # positives per query considered for false-negative masking

# Keys that change how often a run logs, evaluates or checkpoints, never the weights it ends with:
# a rerun may change them and still resume. Every other model and train key is in the fingerprint.
CADENCE_KEYS = {"save_steps", "save_total_limit", "eval_steps", "logging_steps", "report_to"}


# ---------------------------------------------------------------- data
def load_stage_data(stage, run_dir: str, skipped: Counter) -> list[TrainExample]:
    """Training examples of one stage: train.jsonl files and/or judged pairs of BEIR folders,
    narrowed to the stage's `sources` (rows from other sources are left out, not skipped)."""
    examples = []
    for entry in stage.data:
        entry = entry.replace("{run_dir}", run_dir)
        if Path(entry).is_dir() or datasets.is_builtin(entry):
            examples += pairs_from_beir(entry, stage.split, skipped=skipped)
        else:
            examples += read_train_set(entry, skipped=skipped)
    if stage.sources:
        examples = [e for e in examples if source_kind(e.source) in stage.sources]
        if not examples:
            raise DataError(f"stage '{stage.name}': no rows of {stage.data} come from sources {stage.sources}")
    if stage.frozen_documents:  # the stage reads the teacher's candidates, never the negatives
        return usable_examples(examples, 0, skipped, need_candidates=True)
    return usable_examples(examples, stage.num_negatives, skipped, need_scores=stage.distill_weight > 0)


# ---------------------------------------------------------------- step plan
@dataclass
class StagePlan:
    """One stage as the loop runs it: its examples, batches per epoch and optimizer steps."""

    index: int
    stage: object  # embed.recipe.StageConfig
    examples: list[TrainExample]
    per_epoch: int
    steps: int


def plan_stages(stages, stage_examples: list[list[TrainExample]], global_batch: int, seed: int,
                max_steps: int, skipped: Counter) -> list[StagePlan]:
    """Steps of every stage: epochs x batches per epoch, capped by the stage's max_steps; a global
    `max_steps` (smoke runs) then trims the last stages first."""
    plans = []
    for i, (stage, examples) in enumerate(zip(stages, stage_examples)):
        per_epoch = len(epoch_batches(examples, global_batch, seed=seed)) if examples else 0
        if per_epoch == 0:
            raise ConfigError(f"stage '{stage.name}': {len(examples)} usable examples cannot fill one global "
                              f"batch of {global_batch} (skipped: {dict(skipped)})")
        steps = math.ceil(per_epoch * stage.epochs)
        if stage.max_steps:
            steps = min(steps, stage.max_steps)
        plans.append(StagePlan(i, stage, examples, per_epoch, steps))
    if max_steps:
        left = max_steps
        for plan in plans:
            plan.steps = min(plan.steps, left)
            left -= plan.steps
    return plans


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The shuffle seed of one epoch of one stage."""
    return seed * 10_007 + stage * 101 + epoch


def locate(examples: list[TrainExample], global_batch: int, seed: int, stage: int, step: int) -> tuple[int, int]:
    """(epoch, batch index) of a stage's `step`; epochs may differ by a batch (duplicates deferred)."""
    epoch = 0
    while True:
        n = len(epoch_batches(examples, global_batch, seed=epoch_seed(seed, stage, epoch)))
        if step < n:
            return epoch, step
        step -= n
        epoch += 1


def stage_batches(plan: StagePlan, global_batch: int, seed: int, start: int = 0) -> Iterator[list[Group]]:
    """The groups of the global batch of every step from `start` to the stage's end.

    A step's batch and its sampled positives depend only on (seed, stage, step), never on what
    ran before: a resumed run sees exactly the batches the uninterrupted one saw. Each process
    takes its own slice of the global batch."""
    step = start
    while step < plan.steps:
        epoch, first = locate(plan.examples, global_batch, seed, plan.index, step)
        batches = epoch_batches(plan.examples, global_batch, seed=epoch_seed(seed, plan.index, epoch))
        for batch in batches[first:]:
            if step >= plan.steps:
                return
            rng = random.Random(epoch_seed(seed, plan.index, epoch) * 1_000_003 + step)
            yield [make_group(plan.examples[i], plan.stage.num_negatives, rng) for i in batch]
            step += 1


# ---------------------------------------------------------------- model and loss
def freeze_unused_parameters(model) -> int:
    """BERT's pooler head never reaches our embeddings: freeze it so DDP sees no unused grads."""
    n = 0
    for name, p in model.backbone.named_parameters():
        if name.startswith("pooler."):
            p.requires_grad_(False)
            n += 1
    return n


def optimizer_groups(model, lr: float, weight_decay: float, head_lr: float | None) -> list[dict]:
    """AdamW groups: no decay on biases/norms; a freshly initialised pooling head gets its own lr."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith("pooling.")
        decay = p.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((is_head, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
             "lr": (head_lr or lr * 10) if is_head else lr} for (is_head, decay), ps in groups.items()]


def stage_loss(stage, temperature: float, distill_temperature: float, matryoshka_dims: list[int],
               frozen_corpus: tuple | None = None) -> nn.Module:
    """The stage's loss: InfoNCE (in-batch negatives as the stage says), plus the teacher
    distillation term when the stage weights it, wrapped for Matryoshka dimensions; for a
    frozen-documents stage, the teacher's distribution over `frozen_corpus` = (dense half, lexical
    half or None) (embed.training.frozen_corpus)."""
    if stage.frozen_documents:
        from embed.training.frozen_corpus import FrozenCorpusDistillation

        dense, lexical = frozen_corpus
        return FrozenCorpusDistillation(dense, temperature, distill_temperature, corpus_lexical=lexical)
    loss = InfoNCELoss(temperature=temperature, in_batch_negatives=stage.in_batch_negatives)
    if stage.distill_weight:
        loss = ListwiseDistillation(loss, weight=stage.distill_weight, temperature=temperature,
                                    teacher_temperature=distill_temperature)
    if matryoshka_dims:
        loss = MatryoshkaLoss(loss, dims=matryoshka_dims)
    return loss


def channel_weight(cfg) -> tuple[float, str]:
    """(the lexical channel's weight, where it comes from): `model.lexical_weight`, or under
    `model.lexical_weight_rule: generated` the weight the mining stage chose for this domain from its
    generated queries (run_dir/mine_summary.json; 0 = no channel)."""
    if cfg.model.lexical_weight_rule == "fixed":
        return cfg.model.lexical_weight, "model.lexical_weight"
    path = Path(cfg.run_dir) / "mine_summary.json"
    try:
        choice = json.loads(path.read_text())["lexical_channel"]
        weight = float(choice["weight"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: no lexical channel choice (model.lexical_weight_rule: generated needs "
                          "scripts/mine_faiss.py run with the same rule first)") from None
    scheme = choice.get("scheme", "tfidf")  # choices written before schemes existed were TF-IDF
    if scheme != cfg.model.lexical_scheme:
        raise ConfigError(f"{path}: the lexical weight was chosen for model.lexical_scheme {scheme}, this run "
                          f"trains {cfg.model.lexical_scheme}: rerun scripts/mine_faiss.py with the same recipe")
    cut = choice.get("max_length", 0)  # choices written before the key read the dense half's cut
    if cut != cfg.model.lexical_max_length:
        raise ConfigError(f"{path}: the lexical weight was chosen for model.lexical_max_length {cut}, this run "
                          f"trains {cfg.model.lexical_max_length}: rerun scripts/mine_faiss.py with the same recipe")
    return weight, f"chosen by mining ({path}): {choice['reason']}"


def lexical_channel(cfg, model, weight: float):
    """(channel, documents it was fitted on): embed.modeling.lexical's channel for `model`, IDF
    over data.corpus. It depends on the tokenizer and the corpus only, not on the weights, so it
    is fitted once, before training, whether it is attached then (train.lexical_aware) or to the
    final model."""
    from embed.modeling.lexical import fit_lexical_channel

    corpus = load_corpus(cfg.data.corpus)
    channel = fit_lexical_channel(model, [corpus.doc_text(i) for i in range(len(corpus))],
                                  cfg.model.lexical_dim, weight, seed=cfg.seed, scheme=cfg.model.lexical_scheme,
                                  max_length=cfg.model.lexical_max_length)
    return channel, len(corpus)


# ---------------------------------------------------------------- fingerprint
def run_settings(cfg) -> dict:
    """What shapes the trained weights, flattened to dotted keys (`train.stages.0.learning_rate`):
    every model and training key but the cadence ones, the seed, the corpus, and the content
    (sha256) of every stage's data. A checkpoint or a finished model is only continued under the
    same settings."""
    settings = {f"model.{k}": v for k, v in flatten(to_dict(cfg.model)).items()}
    settings.update({f"train.{k}": v for k, v in flatten(to_dict(cfg.train)).items() if k not in CADENCE_KEYS})
    settings.update({"seed": cfg.seed, "data.corpus": cfg.data.corpus})
    if cfg.model.lexical_weight_rule == "generated":  # the weight mining chose shapes the run as a fixed one would
        settings["model.lexical_weight"] = channel_weight(cfg)[0]
    for i, stage in enumerate(cfg.train.stages):
        for j, entry in enumerate(stage.data):
            path = Path(entry.replace("{run_dir}", cfg.run_dir))
            if path.is_dir():
                path = path / "qrels" / f"{stage.split}.tsv"
            if path.is_file():
                settings[f"train.stages.{i}.data.{j}.sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return settings


def flatten(tree, prefix: str = "") -> dict:
    """{'a': {'b': 1}, 'c': [{'d': 2}]} -> {'a.b': 1, 'c.0.d': 2}; lists of scalars stay values."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{prefix}{k}.{i}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
