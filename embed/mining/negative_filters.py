"""Turning ranked candidates into hard negatives: rank fusion, then the positive-aware rules.

Naive top-k mining teaches false negatives: the best-ranked "negatives" of a query are often
relevant documents nobody judged. NV-Retriever's TopK-PercPos rule (arXiv 2407.15831) drops
any candidate that the teacher scores above 95% of the positive's score; with several
positives the least similar positive sets the bar (the safest choice). Positives themselves,
documents whose text duplicates a positive, and positives of another query with the same text
are never negatives, whatever the scores say (FlagEmbedding issue #464 shows how a random
back-fill can otherwise pick the positive).

Each rejected candidate is counted under the first rule it fails, in this order:
  positive       the candidate is a positive (or a positive of a query with the same text)
  duplicate      its text equals a positive's text (whitespace and case ignored)
  rank_range     outside [rank_min, rank_max) of the fused list of remaining candidates
  relative_margin, absolute_margin
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, Optional, Sequence

import numpy as np

RULES = ("positive", "duplicate", "rank_range", "relative_margin", "absolute_margin")


def rrf_fuse(rankings: Sequence[Sequence[int]], k: int = 60) -> list[int]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank of d), rank from 1.

    Entries < 0 (empty slots) are ignored. Ties keep first-seen order (the earlier ranking,
    then the better rank), so the fused list is deterministic.
    """
    fused: dict[int, float] = {}
    for ranking in rankings:
        rank = 0
        for doc in ranking:
            if doc < 0:
                continue
            rank += 1
            fused[int(doc)] = fused.get(int(doc), 0.0) + 1.0 / (k + rank)
    order = {doc: i for i, doc in enumerate(fused)}
    return sorted(fused, key=lambda d: (-fused[d], order[d]))


def normalise_text(text: str) -> str:
    """Text identity for the duplicate rule: case and runs of whitespace do not make a new document."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class NegativeRules:
    num_negatives: int = 4
    relative_margin: Optional[float] = 0.05
    absolute_margin: Optional[float] = None
    rank_min: int = 0
    rank_max: int = 0  # 0 = no upper bound
    sampling: Literal["top", "random"] = "top"

    def score_ceiling(self, positive_score: float) -> tuple[float, float]:
        """Highest allowed teacher score under each margin rule (inf when the rule is off)."""
        relative = (positive_score - abs(positive_score) * self.relative_margin
                    if self.relative_margin is not None else np.inf)
        absolute = positive_score - self.absolute_margin if self.absolute_margin is not None else np.inf
        return relative, absolute


@dataclass
class Selection:
    indices: list[int]
    scores: list[float]
    drops: Counter


def select_negatives(candidates: Sequence[int], teacher_scores: Sequence[float], positive_score: float,
                     positives: Sequence[int], excluded: set[int], text_key: Callable[[int], Hashable],
                     rules: NegativeRules, rng: np.random.Generator) -> Selection:
    """Apply the rules to `candidates` (corpus rows in fused order; `teacher_scores` aligned).

    `positive_score` is the teacher's score of the least similar positive; `positives` are the
    positives' corpus rows and `excluded` adds any other row that must never be a negative;
    `text_key(row)` identifies a row's text for the duplicate rule (e.g. a hash
    of `normalise_text`). Returns the kept negatives in fused order with their teacher scores.
    """
    excluded = set(excluded) | set(positives)
    positive_keys = {text_key(p) for p in positives}
    relative_ceiling, absolute_ceiling = rules.score_ceiling(positive_score)
    drops: Counter = Counter()
    eligible: list[tuple[int, float]] = []
    rank = 0
    for doc, score in zip(candidates, teacher_scores):
        if doc in excluded:
            drops["positive"] += 1
            continue
        if text_key(doc) in positive_keys:
            drops["duplicate"] += 1
            continue
        rank += 1  # 1-based rank among the candidates that could be negatives at all
        if rank <= rules.rank_min or (rules.rank_max and rank > rules.rank_max):
            drops["rank_range"] += 1
            continue
        if score > relative_ceiling:
            drops["relative_margin"] += 1
            continue
        if score > absolute_ceiling:
            drops["absolute_margin"] += 1
            continue
        eligible.append((int(doc), float(score)))
    if rules.sampling == "random" and len(eligible) > rules.num_negatives:
        picked = np.sort(rng.choice(len(eligible), rules.num_negatives, replace=False))
        chosen = [eligible[i] for i in picked]
    else:
        chosen = eligible[:rules.num_negatives]
    return Selection([d for d, _ in chosen], [s for _, s in chosen], drops)
