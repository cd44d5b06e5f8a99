"""Every query filter: length, meta-text, copy, duplicates, and the BM25 / base-model round trip."""
from __future__ import annotations

import numpy as np
import pytest

from embed.query_filters import (RANK_DEPTH, REASONS, BM25RoundTrip, DenseRoundTrip, FilterSettings, QueryFilter,
                                 check_text, copy_overlap, meta_text, normalise)

DOCS = [
    "Vitamin D supplementation increases hip bone density in older women after two years.",
    "Aspirin lowers the risk of a second heart attack in patients with coronary disease.",
    "Deep sleep consolidates memories of motor skills learned during the day.",
    "Statins reduce LDL cholesterol but can cause muscle pain in some patients.",
    "Tax credits for solar panels increased household installations across three states.",
]
NO_ROUND_TRIP = FilterSettings(round_trip="none")


# ---------------------------------------------------------------- text checks
@pytest.mark.parametrize("query, reason", [
    (None, "malformed"),
    ("", "empty"),
    ("  ?! ", "empty"),
    ("bone density", "too_short"),
    (" ".join(["word"] * 25), "too_long"),
    ("This study shows that vitamin D helps bones", "meta_text"),
    ("what did the authors find about bones", "meta_text"),
    ("We found that aspirin helps", "meta_text"),
    ("Sure, here is a query about bones", "meta_text"),
    ('{"query": "bones"} vitamin', "meta_text"),
    ("Vitamin D supplementation increases hip bone density", "copied"),
    ("does vitamin D make old bones stronger", None),
    ("calcium intake fracture prevention elderly", None),
])
def test_check_text_reasons(query, reason):
    assert check_text(query, DOCS[0], NO_ROUND_TRIP) == reason


def test_length_limits_follow_the_settings():
    settings = FilterSettings(min_words=1, max_words=3, round_trip="none")
    assert check_text("bones", DOCS[0], settings) is None
    assert check_text("strong old bones now", DOCS[0], settings) == "too_long"


def test_meta_text_is_generic_not_domain_words():
    assert meta_text("In this paper the method is new") == "this paper"
    assert meta_text("does a paper trail help tax audits") is None  # 'paper' alone is content
    assert meta_text("which study designs detect bias") is None


def test_copy_overlap_counts_shared_word_ngrams():
    doc = "the quick brown fox jumps over the lazy dog"
    assert copy_overlap("quick brown fox jumps", doc, n=3) == 1.0
    assert copy_overlap("quick brown cat sleeps", doc, n=3) == 0.0
    assert copy_overlap("brown fox jumps high", doc, n=3) == pytest.approx(0.5)
    assert copy_overlap("Lazy dog", doc, n=3) == 1.0  # shorter than n: the whole query is one n-gram
    assert copy_overlap("", doc) == 0.0
    settings = FilterSettings(max_copy_overlap=0.5, round_trip="none")
    assert check_text("brown fox jumps high", doc, settings) is None  # 0.5 is not above the limit
    assert check_text("brown fox jumps over", doc, settings) == "copied"


def test_copy_of_the_worked_example_is_rejected():
    example = ["Brisk walking helps older adults fall asleep faster."]
    query = "brisk walking helps older adults fall asleep"
    assert check_text(query, DOCS[2], NO_ROUND_TRIP) is None
    assert check_text(query, DOCS[2], NO_ROUND_TRIP, prompt_texts=example) == "copied"


def test_reasons_are_reported_in_order():
    # too long AND meta-text AND copied: the first in REASONS order wins
    query = "this study " + DOCS[0] + " " + DOCS[0]
    assert check_text(query, DOCS[0], NO_ROUND_TRIP) == "too_long"
    assert REASONS.index("too_long") < REASONS.index("meta_text") < REASONS.index("copied")


# ---------------------------------------------------------------- duplicates
def test_duplicates_first_kept_wins_and_survives_resume():
    qf = QueryFilter(NO_ROUND_TRIP)
    keys = [("d0", 0), ("d1", 0), ("d1", 1)]
    queries = ["Does vitamin D help bones?", "does vitamin d help bones", "aspirin second heart attack risk"]
    verdicts = qf.check(keys, queries, [DOCS[0], DOCS[1], DOCS[1]], [0, 1, 1])
    assert [v.reason for v in verdicts] == [None, "duplicate", None]
    # the same rows seen again (a resumed block) decide the same way, and a kept row is not its own duplicate
    again = qf.check(keys, queries, [DOCS[0], DOCS[1], DOCS[1]], [0, 1, 1])
    assert [v.reason for v in again] == [None, "duplicate", None]
    fresh = QueryFilter(NO_ROUND_TRIP)
    fresh.register_kept(queries[0], ("d0", 0))  # what resume() does with the rows on disk
    assert fresh.check([("d1", 0)], [queries[1]], [DOCS[1]], [1])[0].reason == "duplicate"
    assert normalise("Does  X, cause Y?") == "does x cause y"


def test_a_rejected_query_does_not_block_a_later_identical_one():
    qf = QueryFilter(FilterSettings(round_trip="bm25", round_trip_k=1), [BM25RoundTrip(DOCS)])
    query = "aspirin heart attack risk coronary disease"
    first = qf.check([("d0", 0)], [query], [DOCS[0]], [0])[0]  # asked of the vitamin D document: fails round trip
    second = qf.check([("d1", 0)], [query], [DOCS[1]], [1])[0]
    assert (first.reason, second.reason) == ("round_trip", None)


# ---------------------------------------------------------------- round trip
def test_bm25_round_trip_ranks_the_source_document():
    bm25 = BM25RoundTrip(DOCS)
    ranks = bm25.ranks(["statins cholesterol muscle pain", "statins cholesterol muscle pain", "the of and"], [3, 0, 3])
    assert ranks[0] == 1
    assert ranks[1] is None  # document 0 shares no term with the query: not ranked at all
    assert ranks[2] is None  # stopwords only


def test_round_trip_keeps_only_queries_whose_document_is_in_the_top_k():
    qf = QueryFilter(FilterSettings(round_trip="bm25", round_trip_k=1), [BM25RoundTrip(DOCS)])
    verdicts = qf.check([("d3", 0), ("d0", 0)], ["statins cholesterol muscle pain", "statin side effects muscle pain"],
                        [DOCS[3], DOCS[0]], [3, 0])
    assert [(v.kept, v.reason, v.ranks["bm25"]) for v in verdicts] == [(True, None, 1), (False, "round_trip", None)]


def test_dense_round_trip_exact_rank_in_chunks():
    corpus = np.eye(6, dtype=np.float16)[:, :4]  # rows 4 and 5 are zero vectors
    query = np.array([[0.9, 0.5, 0.1, 0.0]], dtype=np.float32)
    dense = DenseRoundTrip(lambda qs: np.repeat(query, len(qs), axis=0), corpus, chunk_rows=2)
    # scores 0.9, 0.5, 0.1, 0, 0, 0 -> doc 1 has one better document; ties do not count against
    assert dense.ranks(["q", "q", "q"], [0, 1, 2]) == [1, 2, 3]


def test_dense_round_trip_with_the_real_base_model():
    from embed.model import EmbeddingModel

    model = EmbeddingModel.from_pretrained("minilm")
    emb = model.encode(DOCS, kind="document")
    dense = DenseRoundTrip(lambda qs: model.encode(qs, kind="query"), emb)
    queries = ["can vitamin D strengthen bones in older women", "do solar tax credits increase installations"]
    assert dense.ranks(queries, [0, 4]) == [1, 1]
    assert dense.ranks(queries, [4, 0])[0] > 1


def test_modes_both_and_either():
    class Fixed:
        def __init__(self, name, rank):
            self.name, self.rank = name, rank

        def ranks(self, queries, rows):
            return [self.rank for _ in queries]

    retrievers = [Fixed("bm25", 1), Fixed("model", 50)]
    query = ["does vitamin D strengthen bones"]
    both = QueryFilter(FilterSettings(round_trip="both", round_trip_k=10), retrievers)
    either = QueryFilter(FilterSettings(round_trip="either", round_trip_k=10), retrievers)
    assert both.check([("a", 0)], query, [DOCS[0]], [0])[0].reason == "round_trip"
    verdict = either.check([("a", 0)], query, [DOCS[0]], [0])[0]
    assert verdict.kept and verdict.ranks == {"bm25": 1, "model": 50}


def test_settings_are_checked():
    with pytest.raises(ValueError, match="needs at least one retriever"):
        QueryFilter(FilterSettings(round_trip="bm25"))
    with pytest.raises(ValueError, match=f"<= {RANK_DEPTH}"):
        QueryFilter(FilterSettings(round_trip="bm25", round_trip_k=RANK_DEPTH + 1), [BM25RoundTrip(DOCS)])
