"""Pseudo-queries that need no LLM: sentences cropped from the document itself (inverse cloze).

Lee et al. 2019 (ORQA) and Contriever train retrievers on a sentence of a document as the query
and the document as the positive. It is cheap, covers every document of the corpus, and teaches
the model the domain's vocabulary and the exact-term matching that BM25 is strong at; LLM
queries add paraphrase on top. A query of this source is kept out of its positive with
probability `remove_prob` so the model cannot rely on verbatim copying alone.
"""
from __future__ import annotations

import random
import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def cropped_sentences(text: str, k: int, rng: random.Random, min_words: int = 6,
                      max_words: int = 48) -> list[tuple[int, str]]:
    """Up to k (index, sentence) pairs of reasonable length, sampled without replacement."""
    sentences = split_sentences(text)
    candidates = [(i, s) for i, s in enumerate(sentences) if min_words <= len(s.split()) <= max_words]
    rng.shuffle(candidates)
    return sorted(candidates[:k])


def without_sentence(text: str, sentence_index: int) -> str:
    """The document text with one sentence removed (the cloze)."""
    sentences = split_sentences(text)
    return " ".join(s for i, s in enumerate(sentences) if i != sentence_index)
