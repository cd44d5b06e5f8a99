"""Filters that decide which generated queries are good enough to train on.

Small generators write many unusable queries: empty or run-on answers, meta-text about the
document ("This study investigates..."), sentences copied from the document (InPars drops
these: they teach lexical matching only), echoes of the prompt's worked example (its topic words
paired with a document about something else, or a query the base model finds closer to the example
than to its own document), the same query for many documents, and queries
their own document does not answer. The last is the round-trip consistency filter of
Promptagator / InPars: keep a query only if a retriever (BM25 and/or the base embedding
model) ranks its source document in the top k.

Each rejected query keeps the name of the first filter it failed (in `REASONS` order), so the
stage summary can count them and a rerun does not regenerate them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

# Order of the checks; a rejected query records the first one it failed.
REASONS = ("malformed", "empty", "too_short", "too_long", "meta_text", "copied", "example_echo", "duplicate",
           "round_trip")

# Ranks deeper than this are not recorded (None); round_trip_k must not exceed it.
RANK_DEPTH = 100

_WORD = re.compile(r"\w+", re.UNICODE)

# Text that talks about the document, the task or the conversation instead of asking for content.
# Generic English on purpose: the same patterns hold for any domain.
META_PATTERNS = [re.compile(p, re.I) for p in (
    r"\b(this|that|these|the|our)\s+(document|passage|text|article|abstract|paper|papers|study|studies|"
    r"excerpt|snippet|manuscript)\b",
    r"\b(this|these|our)\s+(work|research|investigation|review|report|trial|analysis)\b",
    r"\bthe\s+authors?\b",
    r"\b(we|i)\s+(found|find|show|showed|shown|report|reported|propose|proposed|present|presented|"
    r"investigate|investigated|examine|examined|describe|described|demonstrate|demonstrated|"
    r"hypothesi[sz]e|hypothesi[sz]ed|conclude|concluded|assess|assessed|evaluate|evaluated)\b",
    r"^\s*(sure|certainly|okay|here is|here are|here's|answer|query|output|response)\b",
    r"\b(json|search query|search engine)\b",
    r"[{}]|<\||https?://",
)]


@dataclass(frozen=True)
class FilterSettings:
    min_words: int = 3
    max_words: int = 24
    max_copy_overlap: float = 0.6  # reject when this share of the query's word n-grams is in the document
    copy_ngram: int = 3
    round_trip: str = "bm25"  # none | bm25 | model | both | either
    round_trip_k: int = 10


@dataclass
class Verdict:
    kept: bool
    reason: Optional[str]
    ranks: dict  # retriever name -> 1-based rank of the source document, None beyond RANK_DEPTH


@dataclass
class Assessment:
    text_reason: Optional[str]  # first failed text check, or None
    ranks: dict
    usable: bool  # passed the text checks and the round trip


# ---------------------------------------------------------------- single-query checks
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalise(query: str) -> str:
    """Case and punctuation folded: 'Does X cause Y?' and 'does x cause y' are one query."""
    return " ".join(words(query))


def copy_overlap(query: str, document: str, n: int = 3) -> float:
    """Share of the query's word n-grams that occur verbatim in the document (0..1).

    A query shorter than n words counts as one n-gram: a copied two-word title is still a copy.
    """
    q, d = words(query), words(document)
    if not q:
        return 0.0
    m = min(n, len(q))
    q_grams = [tuple(q[i:i + m]) for i in range(len(q) - m + 1)]
    d_grams = {tuple(d[i:i + m]) for i in range(len(d) - m + 1)}
    return sum(g in d_grams for g in q_grams) / len(q_grams)


def content_terms(text: str) -> frozenset[str]:
    """Stemmed words without English stopwords, as the BM25 round trip sees them ('Walking' -> 'walk')."""
    import bm25s

    tokens = bm25s.tokenize([text], stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)
    return frozenset(tokens[0])


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


@lru_cache(maxsize=8)
def example_topic(prompt_texts: tuple[str, ...]) -> frozenset[str]:
    """The worked example's topic: terms its answers take from its document (`prompt_texts` is the
    example document, then its answers). For the default example: adult, asleep, brisk, fall, sleep, walk.

    Only these, not every word of the example: words such as 'older', 'quality' or 'time' are
    common in any domain, and a human query uses them without its document's wording often enough
    that checking them would reject good queries (tests/test_query_filters.py measures it on SciFact).
    """
    if len(prompt_texts) < 2:
        return frozenset()
    answers = frozenset().union(*(content_terms(t) for t in prompt_texts[1:]))
    return content_terms(prompt_texts[0]) & answers


def example_echo(query: str, document: str, prompt_texts: Sequence[str]) -> frozenset[str]:
    """The worked example's topic terms in the query that its own document does not contain.

    A small generator often writes about the example instead of its document ("does sleep improve
    mental clarity" for a mailbox function); a term its document contains explains itself.
    """
    echoed = content_terms(query) & example_topic(tuple(prompt_texts))
    return echoed - content_terms(document) if echoed else echoed


def meta_text(query: str) -> Optional[str]:
    """The meta-text the query contains (e.g. 'the study'), or None."""
    for pattern in META_PATTERNS:
        match = pattern.search(query)
        if match:
            return match.group(0)
    return None


def check_text(query: Optional[str], document: str, settings: FilterSettings,
               prompt_texts: Sequence[str] = ()) -> Optional[str]:
    """The first failed check that needs only this query and its document, or None.

    `prompt_texts` are the prompt's worked example (its document, then its answers): a small
    generator often answers with the example's query (`copied`), or one about the example's topic
    (`example_echo`), instead of one about its document.
    """
    if query is None:
        return "malformed"
    n_words = len(words(query))
    if n_words == 0:
        return "empty"
    if n_words < settings.min_words:
        return "too_short"
    if n_words > settings.max_words:
        return "too_long"
    if meta_text(query):
        return "meta_text"
    if any(copy_overlap(query, text, settings.copy_ngram) > settings.max_copy_overlap
           for text in (document, *prompt_texts)):
        return "copied"
    if prompt_texts and example_echo(query, document, prompt_texts):
        return "example_echo"
    return None


# ---------------------------------------------------------------- round trip
class BM25RoundTrip:
    """Rank of the source document among the corpus under BM25 (bm25s, stemming + stopwords)."""

    name = "bm25"

    def __init__(self, texts: Sequence[str]):
        from embed.retrieval.bm25_index import BM25Index

        self.index = BM25Index(texts)

    def ranks(self, queries: Sequence[str], doc_rows: Sequence[int]) -> list[Optional[int]]:
        found, _ = self.index.search(list(queries), k=RANK_DEPTH)
        return [_rank_in(row_hits, doc) for row_hits, doc in zip(found, doc_rows)]


class DenseRoundTrip:
    """Rank of the source document under the base embedding model (exact cosine over the corpus).

    `corpus_emb` is the (possibly memory-mapped, fp16) document matrix; it is scored in chunks
    so a large corpus never needs a float32 copy in memory.
    """

    name = "model"

    def __init__(self, encode_queries: Callable[[list[str]], np.ndarray], corpus_emb: np.ndarray,
                 chunk_rows: int = 65536):
        self.encode_queries = encode_queries
        self.corpus_emb = corpus_emb
        self.chunk_rows = chunk_rows

    def ranks(self, queries: Sequence[str], doc_rows: Sequence[int]) -> list[Optional[int]]:
        q = np.asarray(self.encode_queries(list(queries)), dtype=np.float32)  # [Q, D]
        rows = np.asarray(doc_rows)
        source = np.einsum("qd,qd->q", q, np.asarray(self.corpus_emb[rows], dtype=np.float32))  # [Q]
        higher = np.zeros(len(queries), dtype=np.int64)
        for start in range(0, self.corpus_emb.shape[0], self.chunk_rows):
            chunk = np.asarray(self.corpus_emb[start:start + self.chunk_rows], dtype=np.float32)  # [C, D]
            higher += (q @ chunk.T > source[:, None]).sum(axis=1)  # [Q, C] -> [Q]
        return [int(h) + 1 if h < RANK_DEPTH else None for h in higher]


class SharedQueryEncoder:
    """The base model's query encoder, shared by the filters that use it.

    Within one batch the example check encodes the queries that passed the text checks and the
    dense round trip then encodes those it did not flag: the embeddings of the last call are kept,
    so each query is encoded once. Only the last call's are kept: memory stays one batch."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray]):
        self.encode = encode
        self._last: dict[str, np.ndarray] = {}

    def __call__(self, queries: Sequence[str]) -> np.ndarray:
        queries = list(queries)
        if not queries:
            return self.encode(queries)
        missing = [q for q in dict.fromkeys(queries) if q not in self._last]
        table = {q: self._last[q] for q in queries if q in self._last}
        if missing:
            table.update(zip(missing, self.encode(missing)))
        self._last = table
        return np.stack([table[q] for q in queries])


class ExampleProximity:
    """Flags queries the base embedding model finds closer to the prompt's worked example than to
    their own document: such a query is about the example, whatever words it uses.

    The topic-word check (`example_echo`) misses a query that borrows the example's kind of claim
    but none of its words: "does testing with your own device improve your mental clarity" for a
    test-cleanup function shares no word with the walking-and-sleep example, yet scores 0.19 against
    the example and 0.14 against its code under all-MiniLM-L6-v2. A query about its document is
    closer to it than to an unrelated made-up study, so the comparison needs no threshold, and a
    domain whose documents resemble the example (sleep studies) keeps its queries: their own
    document is closer still.
    """

    def __init__(self, encode_queries: Callable[[list[str]], np.ndarray], corpus_emb: np.ndarray,
                 example_emb: np.ndarray):
        self.encode_queries = encode_queries
        self.corpus_emb = corpus_emb
        self.example_emb = np.asarray(example_emb, dtype=np.float32)  # [E, D]: the example's document and answers

    def closer_to_example(self, queries: Sequence[str], doc_rows: Sequence[int]) -> list[bool]:
        q = np.asarray(self.encode_queries(list(queries)), dtype=np.float32)  # [Q, D]
        own = np.einsum("qd,qd->q", q, np.asarray(self.corpus_emb[np.asarray(doc_rows)], dtype=np.float32))
        example = (q @ self.example_emb.T).max(axis=1)  # [Q]
        return (example > own).tolist()


def _rank_in(hits: np.ndarray, doc_row: int) -> Optional[int]:
    where = np.flatnonzero(hits == doc_row)
    return int(where[0]) + 1 if where.size else None


# ---------------------------------------------------------------- the whole filter
class QueryFilter:
    """Runs every check over a batch; remembers kept queries so later duplicates are caught.

    A duplicate is a query whose normalised text was already kept for another (doc, sample):
    the first one in generation order wins, so a resumed run decides exactly as an
    uninterrupted one (the kept rows already on disk are registered first).
    """

    def __init__(self, settings: FilterSettings, retrievers: Sequence = (), prompt_texts: Sequence[str] = (),
                 example_proximity: Optional[ExampleProximity] = None):
        """`prompt_texts`: the worked example shown to the generator (its document, then its answers),
        empty without one; `example_proximity`: the base model's check of queries against it."""
        if settings.round_trip != "none" and not retrievers:
            raise ValueError(f"round_trip={settings.round_trip} needs at least one retriever")
        if settings.round_trip_k > RANK_DEPTH:
            raise ValueError(f"round_trip_k must be <= {RANK_DEPTH}")
        self.settings = settings
        self.retrievers = list(retrievers)
        self.prompt_texts = list(prompt_texts)
        self.example_proximity = example_proximity
        self._kept: dict[str, object] = {}

    def register_kept(self, query: str, key) -> None:
        self._kept.setdefault(normalise(query), key)

    def assess(self, queries: Sequence[Optional[str]], documents: Sequence[str],
               doc_rows: Sequence[int]) -> list[Assessment]:
        """Every check that depends on the query alone: text checks, then the round-trip ranks
        (only for queries that passed them). No state changes: a caller may retry what fails."""
        reasons = [check_text(q, d, self.settings, self.prompt_texts) for q, d in zip(queries, documents)]
        ranks = [{} for _ in queries]
        live = [i for i, r in enumerate(reasons) if r is None]
        if live and self.example_proximity is not None:
            closer = self.example_proximity.closer_to_example([queries[i] for i in live], [doc_rows[i] for i in live])
            for i, echo in zip(live, closer):
                if echo:
                    reasons[i] = "example_echo"
            live = [i for i in live if reasons[i] is None]
        if live:
            for retriever in self.retrievers:
                found = retriever.ranks([queries[i] for i in live], [doc_rows[i] for i in live])
                for i, rank in zip(live, found):
                    ranks[i][retriever.name] = rank
        return [Assessment(r, rk, r is None and self._round_trip_ok(rk)) for r, rk in zip(reasons, ranks)]

    def check(self, keys: Sequence, queries: Sequence[Optional[str]], documents: Sequence[str],
              doc_rows: Sequence[int], assessed: Optional[Sequence[Assessment]] = None) -> list[Verdict]:
        """Final verdicts in order, duplicates included; kept queries are remembered."""
        assessed = assessed if assessed is not None else self.assess(queries, documents, doc_rows)
        verdicts = []
        for key, query, a in zip(keys, queries, assessed):
            reason = a.text_reason
            if reason is None and self._kept.get(normalise(query), key) != key:
                reason = "duplicate"
            if reason is None and not a.usable:
                reason = "round_trip"
            if reason is None:
                self.register_kept(query, key)
            verdicts.append(Verdict(reason is None, reason, a.ranks))
        return verdicts

    def _round_trip_ok(self, ranks: dict) -> bool:
        if self.settings.round_trip == "none":
            return True
        k = self.settings.round_trip_k
        passed = [r is not None and r <= k for r in ranks.values()]
        return any(passed) if self.settings.round_trip == "either" else all(passed)
