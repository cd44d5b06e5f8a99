"""No-duplicates batching is deterministic and keeps shared queries/positives apart."""
import random
from collections import Counter

from embed.data import TrainExample
from embed.training.batching import (
    collate_keys,
    epoch_batches,
    make_group,
    text_key,
    usable_examples,
)


def ex(q, p, negs=()):
    return TrainExample(query=q, pos_ids=[p], pos_texts=[p], neg_ids=list(negs), neg_texts=list(negs))


def test_no_duplicate_positive_or_query_in_a_batch():
    examples = [ex(f"q{i}", f"doc{i % 5}") for i in range(40)]  # 8 queries share each positive
    batches = epoch_batches(examples, batch_size=5, seed=1)
    assert batches
    for b in batches:
        assert len(b) == 5
        assert len({examples[i].pos_texts[0] for i in b}) == 5


def test_batches_are_a_function_of_the_seed():
    examples = [ex(f"q{i}", f"d{i}") for i in range(50)]
    assert epoch_batches(examples, 8, seed=3) == epoch_batches(examples, 8, seed=3)
    assert epoch_batches(examples, 8, seed=3) != epoch_batches(examples, 8, seed=4)
    assert len(epoch_batches(examples, 8, seed=3)) == 6  # the incomplete tail is dropped


def test_short_of_negatives_is_skipped_and_counted():
    skipped = Counter()
    kept = usable_examples([ex("a", "x", ["n1"]), ex("b", "y")], num_negatives=1, skipped=skipped)
    assert [e.query for e in kept] == ["a"] and skipped["short_of_negatives"] == 1


def test_group_and_keys():
    e = TrainExample(query="q", pos_ids=["a", "b"], pos_texts=["A", "B"], neg_ids=["n1", "n2"], neg_texts=["N1", "N2"])
    g = make_group(e, 1, random.Random(0))
    assert g.docs[0] in ("A", "B") and g.docs[1:] == ["N1"]
    doc_keys, pos_keys = collate_keys([g], max_positives=3)
    assert doc_keys.tolist() == [[text_key(g.docs[0]), text_key("N1")]]
    assert pos_keys.tolist() == [[text_key("A"), text_key("B"), -1]]


def test_distillation_needs_teacher_scores_aligned_with_the_group():
    scored = TrainExample(query="q", pos_ids=["a", "b"], pos_texts=["A", "B"], neg_ids=["n1", "n2"],
                          neg_texts=["N1", "N2"], pos_scores=[0.9, 0.8], neg_scores=[0.5, 0.4])
    skipped = Counter()
    kept = usable_examples([scored, ex("r", "y", ["n"])], num_negatives=1, skipped=skipped, need_scores=True)
    assert kept == [scored] and skipped["no_teacher_scores"] == 1
    g = make_group(scored, 1, random.Random(0))
    assert g.scores == [0.9 if g.docs[0] == "A" else 0.8, 0.5]
    assert make_group(ex("r", "y", ["n"]), 1, random.Random(0)).scores is None
