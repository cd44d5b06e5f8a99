"""Contrastive batches: which examples train together, deterministically and without duplicates.

Two examples in one batch that share a query or a positive turn each other's positive into a
false in-batch negative, so batches are filled greedily from a seeded shuffle and an example
that would duplicate something already in the batch waits for a later batch (the idea of
sentence-transformers' NoDuplicatesBatchSampler). The epoch's batch list is a pure function
of (seed, stage, epoch): resuming at batch k of an epoch replays exactly what an
uninterrupted run would have seen, with no sampler state to checkpoint.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from embed.data import TrainExample


def text_key(text: str) -> int:
    """A stable 63-bit id of a text: equal texts get equal keys in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass
class Group:
    """One query with the documents it is trained against: [positive, negative_1..negative_K]."""

    query: str
    docs: list[str]
    pos_keys: list[int]   # keys of ALL the query's positives (for false-negative masking)
    scores: Optional[list[float]] = None  # mining teacher's score of each of `docs`, when the row has them
    cand_ids: Optional[list[str]] = None  # the teacher's candidates and scores (stages with frozen_documents)
    cand_scores: Optional[list[float]] = None


def usable_examples(examples: list[TrainExample], num_negatives: int, skipped: Counter,
                    need_scores: bool = False, need_candidates: bool = False) -> list[TrainExample]:
    """Examples with enough hard negatives for a fixed group size (all_gather needs equal shapes),
    for distillation with the teacher's scores, and for a frozen-documents stage with the
    teacher's candidates."""
    kept = []
    for ex in examples:
        if need_candidates and not ex.cand_ids:
            skipped["no_teacher_candidates"] += 1
            continue
        if len(ex.neg_texts) < num_negatives:
            skipped["short_of_negatives"] += 1
            continue
        if need_scores and (ex.pos_scores is None or ex.neg_scores is None):
            skipped["no_teacher_scores"] += 1
            continue
        kept.append(ex)
    return kept


def epoch_batches(examples: list[TrainExample], batch_size: int, seed: int) -> list[list[int]]:
    """Full batches of example indices with no repeated query or positive text inside a batch."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches, current, seen, waiting = [], [], set(), []
    pending = order
    while pending:
        for i in pending:
            texts = {examples[i].query, *examples[i].pos_texts}
            if texts & seen:
                waiting.append(i)
                continue
            current.append(i)
            seen |= texts
            if len(current) == batch_size:
                batches.append(current)
                current, seen = [], set()
        if len(waiting) == len(pending):
            break  # only mutual duplicates left: they cannot fill a clean batch
        pending, waiting = waiting, []
    return batches  # the incomplete tail is dropped: every process needs equal shapes


def make_group(ex: TrainExample, num_negatives: int, rng: random.Random) -> Group:
    """The example's group: one positive drawn at random (seeded) and its first hard negatives."""
    chosen = rng.randrange(len(ex.pos_texts))
    scores = None
    if ex.pos_scores is not None and ex.neg_scores is not None:
        scores = [ex.pos_scores[chosen], *ex.neg_scores[:num_negatives]]
    return Group(query=ex.query, docs=[ex.pos_texts[chosen], *ex.neg_texts[:num_negatives]],
                 pos_keys=[text_key(t) for t in ex.pos_texts], scores=scores,
                 cand_ids=ex.cand_ids, cand_scores=ex.cand_scores)


def collate_keys(groups: list[Group], max_positives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_keys [B, G] and query_pos_keys [B, P] (padded with -1) for the loss's duplicate masking."""
    doc_keys = torch.tensor([[text_key(d) for d in g.docs] for g in groups], dtype=torch.long)
    pos = [g.pos_keys[:max_positives] + [-1] * (max_positives - len(g.pos_keys[:max_positives])) for g in groups]
    return doc_keys, torch.tensor(pos, dtype=torch.long)
