"""Inverse-cloze pseudo-queries: sentence splitting, the pair rules, determinism."""
from embed.data import Corpus
from embed.generation.cloze import cloze_pair, cloze_pairs, split_sentences

TEXT = ("Statins lower LDL cholesterol in most adults. The effect was 1.5 times larger in women than in men. "
        "E.g. the trial enrolled 4,000 patients over ten years. Side effects were rare and mild overall.")


def test_split_sentences_keeps_decimals_and_abbreviations_whole():
    sentences = split_sentences(TEXT)
    assert len(sentences) == 4
    assert sentences[1] == "The effect was 1.5 times larger in women than in men."


def test_pair_removes_the_query_sentence_from_the_positive():
    pairs = [cloze_pair(f"d{i}", "Statins", TEXT, seed=0, keep_probability=0.0) for i in range(20)]
    for pair in pairs:
        assert pair is not None and not pair.kept_sentence
        assert pair.query in split_sentences(TEXT) and pair.query not in pair.positive
        assert pair.positive.startswith("Statins ")
        assert len(split_sentences(pair.positive.removeprefix("Statins "))) == 3
    assert len({p.query for p in pairs}) > 1  # the sentence varies with the document id


def test_pair_keeps_the_sentence_at_the_given_rate_and_is_deterministic():
    kept = [cloze_pair(f"d{i}", "", TEXT, seed=3, keep_probability=0.5) for i in range(200)]
    assert 60 < sum(p.kept_sentence for p in kept) < 140
    assert all(p.query in p.positive for p in kept if p.kept_sentence)
    assert kept == [cloze_pair(f"d{i}", "", TEXT, seed=3, keep_probability=0.5) for i in range(200)]


def test_documents_without_a_usable_sentence_give_no_pair():
    assert cloze_pair("d", "t", "One single sentence here with enough words in it.", seed=0) is None
    assert cloze_pair("d", "t", "Too short. Also short.", seed=0) is None
    corpus = Corpus(["a", "b"], ["", ""], [TEXT, "Only one sentence in this document at all."], source="mem")
    assert [p.doc_id for p in cloze_pairs(corpus, seed=0)] == ["a"]
