"""Rank fusion and the positive-aware negative rules, on constructed rankings and scores."""
from collections import Counter

import numpy as np
import pytest

from embed.mining.inputs import MiningQuery
from embed.mining.miner import NegativeMiner
from embed.mining.negative_filters import (
    NegativeRules,
    normalise_text,
    rrf_fuse,
    select_negatives,
)
from embed.retrieval.dense_index import DenseIndex


# ---------------------------------------------------------------- fusion
def test_rrf_fuses_by_summed_reciprocal_rank():
    # 1: 1/61 + 1/62, 3: 1/63 + 1/61, 2: 1/62, 4: 1/63
    assert rrf_fuse([[1, 2, 3], [3, 1, 4]], k=60) == [1, 3, 2, 4]


def test_rrf_skips_empty_slots_without_spending_a_rank():
    # -1 is an empty slot: 7 is rank 1 in the second list, so it ties 5 and keeps first-seen order
    assert rrf_fuse([[5, -1], [-1, 7]], k=60) == [5, 7]
    assert rrf_fuse([[-1, -1]]) == []


def test_rrf_matches_a_reference_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rankings = [list(rng.permutation(30)[:rng.integers(1, 20)]) for _ in range(rng.integers(1, 4))]
        k = int(rng.integers(1, 100))
        reference = Counter()
        for ranking in rankings:
            for rank, doc in enumerate(ranking, start=1):
                reference[doc] += 1.0 / (k + rank)
        fused = rrf_fuse(rankings, k=k)
        assert sorted(fused) == sorted(reference)
        assert all(reference[a] >= reference[b] for a, b in zip(fused, fused[1:]))


# ---------------------------------------------------------------- the rules
def select(candidates, scores, positive_score=0.8, positives=(), excluded=(), texts=None, rng_seed=0, **rules):
    texts = texts or {}
    return select_negatives(candidates, scores, positive_score, list(positives), set(excluded),
                            lambda row: normalise_text(texts.get(row, f"doc {row}")),
                            NegativeRules(**{"num_negatives": 10, **rules}), np.random.default_rng(rng_seed))


def test_relative_margin_drops_scores_above_95_percent_of_the_positive():
    # ceiling = 0.8 - 0.8 * 0.05 = 0.76; equal to the ceiling is kept
    sel = select([1, 2, 3, 4], [0.79, 0.761, 0.76, 0.5], relative_margin=0.05)
    assert sel.indices == [3, 4]
    assert sel.drops["relative_margin"] == 2


def test_relative_margin_uses_the_magnitude_for_negative_positive_scores():
    # positive -0.2: ceiling = -0.2 - 0.2 * 0.05 = -0.21
    sel = select([1, 2], [-0.205, -0.3], positive_score=-0.2, relative_margin=0.05)
    assert sel.indices == [2]


def test_absolute_margin_and_both_rules_together():
    sel = select([1, 2, 3], [0.75, 0.71, 0.69], relative_margin=None, absolute_margin=0.1)  # ceiling 0.7
    assert sel.indices == [3] and sel.drops["absolute_margin"] == 2
    sel = select([1, 2, 3], [0.77, 0.75, 0.69], relative_margin=0.05, absolute_margin=0.1)
    assert sel.indices == [3]
    assert sel.drops == Counter(relative_margin=1, absolute_margin=1)


def test_no_margin_keeps_everything_but_positives():
    sel = select([1, 2, 3], [0.99, 0.95, 0.1], positives=[2], relative_margin=None)
    assert sel.indices == [1, 3] and sel.drops == Counter(positive=1)


def test_duplicate_text_and_source_document_are_never_negatives():
    texts = {1: "The  Positive text", 2: "the positive TEXT", 3: "other", 4: "source doc"}
    sel = select([2, 3, 4], [0.1, 0.1, 0.1], positives=[1], excluded=[4], texts=texts, relative_margin=None)
    assert sel.indices == [3]
    assert sel.drops == Counter(duplicate=1, positive=1)


def test_rank_range_counts_only_candidates_that_could_be_negatives():
    # the positive (9) at rank 1 does not use up a rank: rank_min=1 skips 1, rank_max=3 stops after 3
    sel = select([9, 1, 2, 3, 4], [0.1] * 5, positives=[9], rank_min=1, rank_max=3, relative_margin=None)
    assert sel.indices == [2, 3]
    assert sel.drops == Counter(positive=1, rank_range=2)


def test_top_sampling_keeps_the_best_ranked_and_counts_short():
    sel = select([1, 2, 3, 4, 5], [0.1] * 5, num_negatives=2)
    assert sel.indices == [1, 2]
    sel = select([1, 2], [0.9, 0.1], num_negatives=3, relative_margin=0.05)
    assert sel.indices == [2]  # short: only one candidate survives


def test_random_sampling_is_seeded_and_keeps_fused_order():
    cands = list(range(20))
    a = select(cands, [0.1] * 20, num_negatives=5, sampling="random", rng_seed=3)
    b = select(cands, [0.1] * 20, num_negatives=5, sampling="random", rng_seed=3)
    c = select(cands, [0.1] * 20, num_negatives=5, sampling="random", rng_seed=4)
    assert a.indices == b.indices != c.indices
    assert a.indices == sorted(a.indices) and len(set(a.indices)) == 5


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_property_no_negative_is_a_positive_or_a_copy_of_one(sampling):
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = 40
        texts = {i: f"text {rng.integers(0, 15)}" for i in range(n)}  # many rows share a text
        positives = list(rng.choice(n, rng.integers(1, 4), replace=False))
        candidates = list(rng.permutation(n)[:rng.integers(0, n)])
        scores = rng.uniform(-1, 1, len(candidates))
        sel = select(candidates, scores, positive_score=float(rng.uniform(-1, 1)), positives=positives,
                     texts=texts, num_negatives=int(rng.integers(1, 8)), sampling=sampling,
                     relative_margin=None if trial % 2 else 0.05, rng_seed=trial)
        positive_texts = {normalise_text(texts[p]) for p in positives}
        assert not set(sel.indices) & set(positives)
        assert not {normalise_text(texts[i]) for i in sel.indices} & positive_texts
        assert len(sel.indices) == len(set(sel.indices))


# ---------------------------------------------------------------- the miner: the least similar positive sets the bar
def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_miner_uses_the_minimum_positive_score():
    query = unit([1, 0, 0])
    # rows: 0 positive (score 0.9), 1 positive (score 0.6), 2 candidate (0.7), 3 candidate (0.3)
    rows = [unit([0.9, np.sqrt(1 - 0.81), 0]), unit([0.6, 0.8, 0]), unit([0.7, 0, np.sqrt(0.51)]),
            unit([0.3, 0, np.sqrt(0.91)])]
    emb = np.stack(rows).astype(np.float16)
    miner = NegativeMiner(emb, NegativeRules(num_negatives=2, relative_margin=0.05), depth=4, rrf_k=60, seed=0,
                          dense=DenseIndex(emb))
    [mined] = miner.mine([MiningQuery("q", "query", [0, 1])], query[None])
    assert mined.selection.indices == [3]  # 0.7 > 0.6 - 0.03 is dropped; with the max positive (0.9) it would stay
    assert mined.selection.drops == Counter(positive=2, relative_margin=1)
    assert mined.positive_scores == pytest.approx([0.9, 0.6], abs=2e-3)


def test_hybrid_teacher_mixes_cosine_with_relative_bm25_and_filters_on_it():
    """Candidate 2 is well below the positive for the dense teacher but matches every query word
    where the positive matches one: the hybrid teacher scores it above the positive's margin and
    drops it as a likely unjudged positive."""
    from embed.retrieval.bm25_index import BM25Index

    texts = ["protein trial results", "weather report", "kinase inhibitor protein binding", "gardening tips"]
    query = unit([1, 0, 0])
    emb = np.stack([unit([0.8, 0.6, 0]), unit([0.5, 0, np.sqrt(0.75)]), unit([0.6, 0, 0.8]),
                    unit([0.1, np.sqrt(0.99), 0])]).astype(np.float16)
    lexical = BM25Index(texts)
    rules = NegativeRules(num_negatives=3, relative_margin=0.05)
    dense_only = NegativeMiner(emb, rules, depth=4, rrf_k=60, seed=0, dense=DenseIndex(emb))
    hybrid = NegativeMiner(emb, rules, depth=4, rrf_k=60, seed=0, dense=DenseIndex(emb), lexical=lexical,
                           teacher_bm25_weight=0.5)
    q = MiningQuery("q", "protein kinase inhibitor", [0])
    [plain] = dense_only.mine([q], query[None])
    [mixed] = hybrid.mine([q], query[None])
    assert sorted(plain.selection.indices) == [1, 2, 3]
    rel = lexical.relative_scores("protein kinase inhibitor", [0, 2])
    assert mixed.positive_scores == pytest.approx([0.5 * 0.8 + 0.5 * rel[0]], abs=2e-3)
    assert 2 not in mixed.selection.indices and mixed.selection.drops["relative_margin"] == 1
    assert dict(zip(mixed.selection.indices, mixed.selection.scores))[1] == pytest.approx(0.25, abs=2e-3)


def test_hybrid_teacher_needs_a_lexical_index():
    emb = np.eye(3, dtype=np.float16)
    with pytest.raises(ValueError, match="teacher_bm25_weight > 0 needs a lexical"):
        NegativeMiner(emb, NegativeRules(), depth=2, rrf_k=60, seed=0, dense=DenseIndex(emb), teacher_bm25_weight=0.3)
