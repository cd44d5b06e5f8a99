"""Choosing the lexical channel's weight without labels, per domain.

The channel (embed.modeling.lexical) helps where queries and documents share rare words (claims
and abstracts) and hurts where they do not (docstrings and code). Which case a domain is can be
read off its own generated queries: each names the document it was written from, so ranking that
document under the mixed score (1 - w) * cosine_dense + w * lexical_score measures w on this
domain, with no judgement and no test query.

The queries used are every generated query that passed the text filters (copy, meta, example
echo) — the kept ones AND those the round-trip filter rejected. The round-trip filter ranks with
BM25 by default: the kept queries alone are those BM25 already finds, which would favour the
lexical channel. A weight is adopted only if its per-query gain over the dense model alone is
clearly above noise (mean gain > `z` standard errors of the paired per-query differences: with a
few hundred queries, one lucky weight of eight is otherwise easy to find); otherwise the channel
stays off, and the summary says why.
"""
from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclasses.dataclass
class WeightChoice:
    weight: float                  # 0.0 = channel off
    reason: str
    mrr_at_10: dict[str, float]    # str(w) -> MRR@10 x 100 of the source documents
    queries: int


def reciprocal_ranks(scores: np.ndarray, source_rows: np.ndarray) -> np.ndarray:
    """Per query, 1 / rank of its source document if in the top 10, else 0; ties count against it."""
    # scores [Q, N]; the source's rank = 1 + documents scored strictly higher + other documents tied
    source = scores[np.arange(len(scores)), source_rows][:, None]
    rank = 1 + (scores > source).sum(axis=1) + ((scores == source).sum(axis=1) - 1)
    return np.where(rank <= 10, 1.0 / rank, 0.0)


def mrr_at_10(scores: np.ndarray, source_rows: np.ndarray) -> float:
    return float(reciprocal_ranks(scores, source_rows).mean())


def choose_channel_weight(dense: np.ndarray, lexical: np.ndarray, source_rows: np.ndarray, grid=DEFAULT_GRID,
                          z: float = 2.0) -> WeightChoice:
    """The grid weight with the best MRR@10 of generated queries' source documents, if above noise.

    dense, lexical [Q, N]: each half's score (cosine; lexical score in [0, 1]) of every query with every document.
    source_rows [Q]: each query's source document (row of the corpus).
    """
    if len(source_rows) == 0:
        raise ValueError("choose_channel_weight: no generated queries to choose the weight on")
    if 0.0 not in grid:
        raise ValueError("choose_channel_weight: the grid must contain 0.0 (the dense model alone)")
    rr = {w: reciprocal_ranks((1 - w) * dense + w * lexical, source_rows) for w in grid}
    table = {str(w): round(100 * float(r.mean()), 2) for w, r in rr.items()}
    best = max(grid, key=lambda w: (table[str(w)], -w))  # ties: the smaller weight
    diff = 100 * (rr[best] - rr[0.0])
    gain, stderr = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    if best == 0.0 or not gain > z * stderr:
        return WeightChoice(0.0, f"channel off: the best weight {best} gains {gain:+.2f} MRR@10 over the dense model "
                                 f"alone on {len(source_rows)} generated queries, within noise (needs > {z} x "
                                 f"{stderr:.2f} standard error)", table, len(source_rows))
    return WeightChoice(best, f"w = {best}: MRR@10 {table[str(best)]:.2f} against {table['0.0']:.2f} for the dense "
                              f"model alone on {len(source_rows)} generated queries (gain {gain:+.2f}, standard "
                              f"error {stderr:.2f})", table, len(source_rows))


def lexical_scores(model, channel, queries: list[str], documents: list[str], batch_size: int = 256) -> np.ndarray:
    """[Q, N] lexical scores of the channel (the dot product of its query and document vectors), queries
    without their prompt (as the channel sees them) and texts cut where the channel cuts them;
    documents in blocks, so memory is O(Q x N)."""
    import torch

    def vectors(texts, kind):
        out = []
        for start in range(0, len(texts), batch_size):
            features = model.tokenize(texts[start:start + batch_size], kind=kind, prompt="", max_length=channel.max_length)
            is_query = torch.full((len(features["input_ids"]),), kind == "query", dtype=torch.bool)
            with torch.no_grad():
                out.append(channel.lexical(features["input_ids"], features["attention_mask"], is_query))
        return torch.cat(out)

    q = vectors(queries, "query")                                               # [Q, L]
    return torch.cat([q @ vectors(documents[start:start + 4096], "document").T  # [Q, block]
                      for start in range(0, len(documents), 4096)], dim=1).numpy()
