"""Inverse-cloze pseudo-queries (Lee et al., 2019, ORQA): a sentence of a document is the query and
the rest of the document the positive. No LLM is needed, so every document of the corpus gets one in
seconds, where a 135M LLM on a CPU writes ~11 a minute. In claim-style collections (SciFact, FEVER)
a document's own finding sentences read like the test claims.

The sentence is removed from the positive in most pairs, so the model must match meaning rather
than copy words; it is kept in a fraction of them (ORQA keeps 10%) so that exact overlap still
counts for something, as it does for real queries.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator

# A sentence ends at . ! or ? followed by space and a capital or digit: abbreviations like "e.g. the"
# and decimals like "1.5" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@dataclass(frozen=True)
class ClozePair:
    doc_id: str
    query: str
    positive: str     # title + the document with the query sentence removed (or kept)
    kept_sentence: bool


def cloze_pair(doc_id: str, title: str, text: str, *, seed: int, min_words: int = 6, max_words: int = 40,
               keep_probability: float = 0.1) -> ClozePair | None:
    """One pair from one document, or None when it has fewer than two sentences or no sentence of a
    usable length. Deterministic in (seed, doc_id): reruns and resumed runs pick the same sentence."""
    sentences = split_sentences(text)
    candidates = [i for i, s in enumerate(sentences) if min_words <= len(s.split()) <= max_words]
    if len(sentences) < 2 or not candidates:
        return None
    rng = random.Random(f"{seed}:{doc_id}")
    chosen = rng.choice(candidates)
    keep = rng.random() < keep_probability
    rest = sentences if keep else sentences[:chosen] + sentences[chosen + 1:]
    positive = " ".join(part for part in (title.strip(), " ".join(rest)) if part)
    return ClozePair(doc_id, sentences[chosen], positive, keep)


def cloze_pairs(corpus, *, seed: int, min_words: int = 6, max_words: int = 40,
                keep_probability: float = 0.1) -> Iterator[ClozePair]:
    """A pair for every document that yields one, in corpus order."""
    for i, doc_id in enumerate(corpus.ids):
        pair = cloze_pair(doc_id, corpus.titles[i], corpus.texts[i], seed=seed, min_words=min_words,
                          max_words=max_words, keep_probability=keep_probability)
        if pair is not None:
            yield pair
