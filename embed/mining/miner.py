"""Hard-negative mining, stage by stage: inputs, teacher embeddings, candidates, negatives, outputs.

scripts/mine_faiss.py calls these functions in order; bench/bench_mine.py reuses the pieces.
The pieces live in their own modules: embed.retrieval.embedding_cache (corpus embeddings on disk),
embed.bm25_index and embed.retrieval.dense_index (candidates), embed.mining.negative_filters (fusion and the
positive-aware rules). This module joins them and owns the run's files:

  run_dir/train.jsonl            the training-set schema (embed.data.TrainExample), one row a query; its
                                 `source` (generated, cloze, qrels:<path>) lets a training stage pick
  run_dir/mine_summary.json      counts, drops per rule, negatives-per-query histogram, timings, peak RSS
  run_dir/mine_scores.png        teacher scores of positives vs kept negatives (see the margin work)
  run_dir/train.jsonl.partial    append-only while mining, keyed by query_id; renamed when complete
  run_dir/mine_stats.jsonl.partial   per-query drop counts, so a resumed run's summary covers all queries
  run_dir/mine_resume.json       fingerprint of settings + inputs: a partial file from other settings is discarded
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from embed.errors import ConfigError
from embed.mining.inputs import MiningQuery
from embed.mining.negative_filters import (
    NegativeRules,
    Selection,
    normalise_text,
    rrf_fuse,
    select_negatives,
)


# ---------------------------------------------------------------- settings
def check_mine_config(mine) -> None:
    """Cross-key checks of the `mine:` section, each naming its key."""
    if mine.num_negatives < 1:
        raise ConfigError("key 'mine.num_negatives' must be >= 1")
    if mine.depth < mine.num_negatives:
        raise ConfigError(f"key 'mine.depth' ({mine.depth}) must be >= mine.num_negatives ({mine.num_negatives})")
    for key in ("relative_margin", "absolute_margin"):
        value = getattr(mine, key)
        if value is not None and value < 0:
            raise ConfigError(f"key 'mine.{key}' must be >= 0 or null")
    if mine.unjudged_queries and "dense" not in mine.retrievers:
        raise ConfigError("key 'mine.unjudged_queries' needs 'dense' in mine.retrievers (an unjudged query's positive "
                          "is the teacher's best candidate, and BM25 alone finds none for a query sharing no word)")
    if mine.rank_min < 0 or mine.rank_max < 0:
        raise ConfigError("keys 'mine.rank_min' and 'mine.rank_max' must be >= 0")
    if mine.rank_max and mine.rank_max <= mine.rank_min:
        raise ConfigError(f"key 'mine.rank_max' ({mine.rank_max}) must be 0 or > mine.rank_min ({mine.rank_min})")
    if not mine.generated and not mine.qrels and not mine.unjudged_queries:
        raise ConfigError("keys 'mine.generated' (false), 'mine.qrels' and 'mine.unjudged_queries' (empty) "
                          "leave nothing to mine")
    if not mine.retrievers:
        raise ConfigError("key 'mine.retrievers' must name at least one of: dense, bm25")
    if mine.teacher_candidates < 0:
        raise ConfigError("key 'mine.teacher_candidates' must be >= 0")
    if not 0.0 <= mine.teacher_bm25_weight <= 1.0:
        raise ConfigError(f"key 'mine.teacher_bm25_weight' must be in [0, 1], got {mine.teacher_bm25_weight}")
    for key in ("batch_size", "encode_batch_size", "rrf_k", "cache_chunk_size"):
        if getattr(mine, key) < 1:
            raise ConfigError(f"key 'mine.{key}' must be >= 1")


def rules_from_config(mine) -> NegativeRules:
    return NegativeRules(num_negatives=mine.num_negatives, relative_margin=mine.relative_margin,
                         absolute_margin=mine.absolute_margin, rank_min=mine.rank_min, rank_max=mine.rank_max,
                         sampling=mine.sampling)


# ---------------------------------------------------------------- the teacher and its corpus embeddings
def load_teacher(cfg, device=None):
    """The scoring model: `mine.teacher` with its own settings, or the recipe's model as configured."""
    from embed.modeling.model import EmbeddingModel, load_from_config

    if cfg.mine.teacher:
        model = EmbeddingModel.from_pretrained(cfg.mine.teacher, attn_implementation=cfg.model.attn_implementation,
                                               trust_remote_code=cfg.model.trust_remote_code)
        name = cfg.mine.teacher
    else:
        model = load_from_config(cfg.model)
        name = cfg.model.name_or_path
    if device is not None:
        model.to(device)
    return model, name


def encode_by_token_length(model, texts: Sequence[str], kind: str, batch_size: int) -> np.ndarray:
    """`model.encode` in batches of similar *token* length: float32 [N, D] in input order.

    `encode` sorts by characters; on SciFact that pads 4% more tokens than sorting by token
    count, and on a CPU a batch costs what its padded tokens cost. Counting tokens is one fast
    tokenizer pass (under 1% of the encoding time). Each batch is one `encode` call, so its own
    sort only permutes within the batch.
    """
    s = model.settings
    prompt, max_length = (s.query_prompt, s.query_max_length) if kind == "query" else (s.document_prompt, s.max_length)
    lengths = [len(ids) for ids in model.tokenizer([prompt + t for t in texts], truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out = None
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        emb = model.encode([texts[i] for i in rows], kind=kind, batch_size=len(rows))
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    return out


# ---------------------------------------------------------------- mining one batch
@dataclass
class MinedQuery:
    query: MiningQuery
    positive_scores: list[float]
    selection: Selection
    n_candidates: int
    candidates: list[tuple[int, float]] = field(default_factory=list)  # (row, teacher score): positives, then the best


class NegativeMiner:
    """Candidates from each retriever -> RRF -> teacher scores -> positive-aware selection.

    `corpus_emb` is the (memory-mapped) teacher embedding matrix; `dense` and `bm25` are the
    candidate retrievers (either may be None); `text_of(row)` gives a document's text for the
    duplicate rule (None: rows are their own identity, e.g. synthetic benchmarks).
    With `lexical` (a BM25Index) and `teacher_bm25_weight` w > 0 the teacher is hybrid: cosine mixed
    with relative BM25 (`BM25Index.relative_scores`). Where a small dense teacher misses the rare
    terms of a specialised domain, the hybrid ranks better than either part, so its scores make
    safer margins and better targets for distillation (train.stages.*.distill_weight).
    """

    def __init__(self, corpus_emb: np.ndarray, rules: NegativeRules, depth: int, rrf_k: int, seed: int,
                 dense=None, bm25=None, text_of: Optional[Callable[[int], str]] = None,
                 lexical=None, teacher_bm25_weight: float = 0.0, teacher_candidates: int = 0):
        if dense is None and bm25 is None:
            raise ConfigError("key 'mine.retrievers' must name at least one of: dense, bm25")
        if teacher_bm25_weight and lexical is None:
            raise ValueError("NegativeMiner: teacher_bm25_weight > 0 needs a lexical (BM25) index")
        self.corpus_emb, self.rules, self.depth, self.rrf_k, self.seed = corpus_emb, rules, depth, rrf_k, seed
        self.dense, self.bm25, self.text_of = dense, bm25, text_of
        self.lexical, self.teacher_bm25_weight = lexical, teacher_bm25_weight
        self.teacher_candidates = teacher_candidates
        self._text_keys: dict[int, int] = {}
        self.seconds = Counter()

    def _text_key(self, row: int):
        if self.text_of is None:
            return row
        key = self._text_keys.get(row)
        if key is None:
            key = self._text_keys[row] = hash(normalise_text(self.text_of(row)))
        return key

    def _best_candidates(self, q: MiningQuery, fused, cand_scores, pos_scores) -> list[tuple[int, float]]:
        """The query's positives, then its `teacher_candidates` best-scored other candidates.

        The fused pool (dense and BM25 top-`depth`) holds nearly all of a query's teacher mass:
        a document outside both lists scores low under either half of the teacher."""
        if not self.teacher_candidates:
            return []
        positives = set(q.positive_rows)
        best = [(int(fused[j]), float(cand_scores[j])) for j in np.argsort(-np.asarray(cand_scores), kind="stable")
                if int(fused[j]) not in positives][:self.teacher_candidates]
        return [(int(r), float(s)) for r, s in zip(q.positive_rows, pos_scores)] + best

    def _teacher_scores(self, text: str, rows: list[int], q_vec: np.ndarray) -> np.ndarray:
        """The teacher's scores of corpus `rows` for one query: cosine, or the hybrid's mix with BM25."""
        scores = np.asarray(self.corpus_emb[rows], dtype=np.float32) @ q_vec if rows else np.zeros(0, np.float32)
        if self.teacher_bm25_weight and rows:
            w = self.teacher_bm25_weight
            scores = (1 - w) * scores + w * self.lexical.relative_scores(text, rows)
        return scores

    def _rng(self, query_id: str) -> np.random.Generator:
        """Seeded per query, so a resumed run samples exactly what an uninterrupted one would."""
        digest = int.from_bytes(hashlib.sha256(query_id.encode()).digest()[:8], "little")
        return np.random.default_rng([self.seed, digest])

    def mine(self, queries: Sequence[MiningQuery], query_emb: np.ndarray) -> list[MinedQuery]:
        # room for the positives, which are found and then removed
        k = self.depth + max(len(q.positive_rows) + len(q.excluded_rows) for q in queries)
        t0 = time.perf_counter()
        rankings: list[np.ndarray] = []
        if self.dense is not None:
            rankings.append(self.dense.search(query_emb, k)[1])            # [Q, k]
        t1 = time.perf_counter()
        if self.bm25 is not None:
            rankings.append(self.bm25.search([q.text for q in queries], k)[0])  # [Q, k]
        t2 = time.perf_counter()
        out = []
        for i, q in enumerate(queries):
            fused = rrf_fuse([r[i] for r in rankings], k=self.rrf_k)
            scores = self._teacher_scores(q.text, list(fused) + list(q.positive_rows), query_emb[i].astype(np.float32))
            cand_scores, pos_scores = scores[:len(fused)], scores[len(fused):]
            if not q.positive_rows:  # unjudged: the teacher's best candidate is the positive
                best = int(np.argmax(cand_scores))
                q = replace(q, positive_rows=[int(fused[best])])
                pos_scores = cand_scores[best:best + 1]
                fused, cand_scores = fused[:best] + fused[best + 1:], np.delete(cand_scores, best)
            selection = select_negatives(fused, cand_scores, float(pos_scores.min()), q.positive_rows, set(q.excluded_rows),
                                         self._text_key, self.rules, self._rng(q.query_id))
            out.append(MinedQuery(q, [float(s) for s in pos_scores], selection, len(fused),
                                  self._best_candidates(q, fused, cand_scores, pos_scores)))
        self.seconds.update(dense_search=t1 - t0, bm25_search=t2 - t1, filter=time.perf_counter() - t2)
        return out
