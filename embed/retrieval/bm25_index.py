"""Lexical candidates for mining: BM25 over the corpus with bm25s (English stemming and stopwords).

BM25 finds negatives that share the query's words but not its meaning, which a dense teacher
of the same family as the student tends to rank differently; fusing both gives harder, more
varied candidates than either alone (see embed.mining.negative_filters.rrf_fuse).
"""
from __future__ import annotations

from typing import Sequence

import bm25s
import numpy as np
import Stemmer


class BM25Index:
    """A bm25s index over `texts`; `search` returns corpus row indices, -1 where nothing matched."""

    def __init__(self, texts: Sequence[str], language: str = "english", stopwords: str = "en"):
        self._stemmer = Stemmer.Stemmer(language)
        self._stopwords = stopwords
        tokens = bm25s.tokenize(list(texts), stopwords=stopwords, stemmer=self._stemmer, show_progress=False)
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)
        self.num_docs = len(texts)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices [Q, k] int64, scores [Q, k] float32), best first.

        A document with BM25 score 0 shares no term with the query: bm25s still fills the k
        slots with such documents, so they are reported as -1 (no candidate) instead.
        """
        k = min(k, self.num_docs)
        indices = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        tokens = self._tokenize(queries)
        rows = [i for i, t in enumerate(tokens) if t]  # a query of stopwords only has nothing to match
        if not rows or k == 0:
            return indices, scores
        docs, found = self._retriever.retrieve([tokens[i] for i in rows], k=k, show_progress=False)
        matched = found > 0
        indices[rows] = np.where(matched, docs, -1)
        scores[rows] = np.where(matched, found, 0.0)
        return indices, scores

    def relative_scores(self, query: str, rows: Sequence[int]) -> np.ndarray:
        """BM25 of corpus `rows` for `query` over the query's best score in the corpus: float32 in [0, 1].

        Raw BM25 has no fixed scale (it grows with query length and term rarity); dividing by the
        best match puts it on the footing of a cosine so the two can be mixed (embed.mining's
        hybrid teacher). A query sharing no term with the corpus scores 0 everywhere.
        """
        tokens = self._tokenize([query])[0]
        if not tokens:
            return np.zeros(len(rows), dtype=np.float32)
        full = self._retriever.get_scores(tokens)
        best = float(full.max())
        if best <= 0:
            return np.zeros(len(rows), dtype=np.float32)
        return (full[np.asarray(rows, dtype=np.int64)] / best).astype(np.float32)

    def _tokenize(self, queries: Sequence[str]) -> list[list[str]]:
        """Queries as the index's terms (same stemmer and stopwords as the corpus)."""
        return bm25s.tokenize(list(queries), stopwords=self._stopwords, stemmer=self._stemmer,
                              return_ids=False, show_progress=False)
