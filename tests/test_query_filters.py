"""Every query filter: length, meta-text, copy, duplicates, and the BM25 / base-model round trip."""
from __future__ import annotations

import numpy as np
import pytest

from embed.generation.filters import (
    RANK_DEPTH,
    REASONS,
    BM25RoundTrip,
    DenseRoundTrip,
    ExampleProximity,
    FilterSettings,
    QueryFilter,
    SharedQueryEncoder,
    check_text,
    copy_overlap,
    example_echo,
    example_topic,
    meta_text,
    normalise,
)

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


# The default prompt's worked example (a walking-and-sleep study), as the generation script passes it.
WORKED_EXAMPLE = (
    "Walking and sleep in later life. In a trial of 120 adults aged 65 to 80, twelve weeks of brisk "
    "walking three times a week shortened the time needed to fall asleep by 15 minutes and reduced "
    "night-time waking, compared with a stretching group.",
    "Brisk walking helps older adults fall asleep faster.",
    "does walking help older people sleep better",
    "aerobic exercise sleep quality elderly",
)
MAILBOX_DOC = ("mailbox._mboxMMDFMessage._explain_to def _explain_to(self, message): "
               "if isinstance(message, MaildirMessage): flags = set(self.get_flags()) ...")
IMAP_STATUS_DOC = ("imaplib.IMAP4.status def status(self, mailbox, names): name = 'STATUS' "
                   "typ, dat = self._simple_command(name, mailbox, names) return self._untagged_response(typ, dat, name)")
PUFFS_DOC = "Heat-shock puffs. Chromosome puffs in Drosophila salivary glands form within minutes of a heat shock."
SLEEP_DOC = "Shift work and sleep. Night-shift nurses slept 1.5 hours less than day-shift nurses."
OS_WALK_DOC = "os.walk def walk(top, topdown=True, onerror=None): yield top, dirs, nondirs for each directory"


@pytest.mark.parametrize("query, document", [
    ("does sleep improve mental clarity", MAILBOX_DOC),  # the leaks the issue quotes
    ("Does status help older people sleep better", IMAP_STATUS_DOC),
    ("does the heat-shock puffs improve sleep quality", PUFFS_DOC),
    ("brisk walking for mailbox flags", MAILBOX_DOC),
])
def test_echo_of_the_worked_example_is_rejected(query, document):
    assert check_text(query, document, NO_ROUND_TRIP, prompt_texts=WORKED_EXAMPLE) == "example_echo"
    assert example_echo(query, document, WORKED_EXAMPLE)  # names the echoed terms
    assert check_text(query, document, NO_ROUND_TRIP) is None  # nothing to echo without an example


@pytest.mark.parametrize("query, document", [
    ("does shift work shorten sleep in nurses", SLEEP_DOC),  # the example's topic, explained by its document
    ("how to walk a directory tree top down", OS_WALK_DOC),
    ("convert maildir flags when copying a message", MAILBOX_DOC),
    ("how fast do chromosome puffs appear after heat", PUFFS_DOC),
    ("which older flags does the imap status command return", IMAP_STATUS_DOC),  # 'older' alone is generic
])
def test_legitimate_queries_pass_the_echo_check(query, document):
    assert check_text(query, document, NO_ROUND_TRIP, prompt_texts=WORKED_EXAMPLE) is None


def test_example_topic_is_what_its_answers_take_from_its_document():
    # stems shared by the example document and its answers; generic words ('older', 'quality') are not in it
    assert example_topic(WORKED_EXAMPLE) == {"adult", "asleep", "brisk", "fall", "sleep", "walk"}
    assert example_topic(WORKED_EXAMPLE[:1]) == frozenset()  # no answers: no topic to echo
    assert example_echo("sleeping badly after walks", "nothing related", WORKED_EXAMPLE) == {"sleep", "walk"}


def test_human_claims_rarely_look_like_echoes(scifact_dir):
    """The price of the echo check on real queries: SciFact's human claims against their judged
    abstracts (both splits). A few mention adults without their abstract saying 'adult'; the other
    words of the example ('older', 'quality', 'time') are not checked, as they would flag 9% here."""
    from embed.data import load_corpus, load_qrels, load_queries

    corpus, queries = load_corpus(str(scifact_dir)), load_queries(str(scifact_dir))
    pairs = [(queries[q], corpus.doc_text(corpus.index[d]))
             for split in ("train", "test") for q, docs in load_qrels(str(scifact_dir / "qrels" / f"{split}.tsv")).items()
             for d, score in docs.items() if score > 0 and q in queries and d in corpus.index]
    flagged = [q for q, d in pairs if example_echo(q, d, WORKED_EXAMPLE)]
    assert len(pairs) > 1000 and len(flagged) / len(pairs) < 0.01, flagged


def test_a_query_closer_to_the_example_than_to_its_document_is_an_echo():
    # 2-d stand-in embeddings: documents 0 and 1; the example at 45 degrees between the axes
    corpus = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    example = np.array([[0.7071, 0.7071]], dtype=np.float32)
    vectors = {"about its document": [0.95, 0.31], "about the example": [0.31, 0.95]}
    proximity = ExampleProximity(lambda qs: np.array([vectors[q] for q in qs], dtype=np.float32), corpus, example)
    # cosine to document 0: 0.95 and 0.31; to the example: 0.89 both
    assert proximity.closer_to_example(["about its document", "about the example"], [0, 0]) == [False, True]
    assert proximity.closer_to_example(["about the example"], [1]) == [False]  # its document is closer still

    class Ranks:  # the round trip only sees what passed the checks before it
        name, asked = "bm25", []

        def ranks(self, queries, rows):
            self.asked.extend(queries)
            return [1 for _ in queries]

    retriever = Ranks()
    qf = QueryFilter(FilterSettings(round_trip="bm25", round_trip_k=10), [retriever], example_proximity=proximity)
    verdicts = qf.check([("a", 0), ("b", 0)], ["about its document", "about the example"], DOCS[:2], [0, 0])
    assert [(v.kept, v.reason) for v in verdicts] == [(True, None), (False, "example_echo")]
    assert retriever.asked == ["about its document"]


@pytest.fixture(scope="module")
def minilm():
    from embed.modeling.model import EmbeddingModel

    return EmbeddingModel.from_pretrained("minilm")


def test_the_example_check_and_the_dense_round_trip_encode_each_query_once():
    vectors = {"about its document": [0.95, 0.31], "about the example": [0.31, 0.95], "also its document": [0.9, 0.1]}
    encoded = []

    def encode(queries):
        encoded.extend(queries)
        return np.array([vectors[q] for q in queries], dtype=np.float32)

    shared = SharedQueryEncoder(encode)
    corpus = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    proximity = ExampleProximity(shared, corpus, np.array([[0.7071, 0.7071]], dtype=np.float32))
    qf = QueryFilter(FilterSettings(round_trip="model", round_trip_k=1), [DenseRoundTrip(shared, corpus)],
                     example_proximity=proximity)
    queries = ["about its document", "about the example", "also its document"]
    verdicts = qf.check([("a", 0), ("b", 0), ("c", 0)], queries, DOCS[:3], [0, 0, 0])
    assert [(v.kept, v.reason) for v in verdicts] == [(True, None), (False, "example_echo"), (True, None)]
    assert encoded == queries  # the round trip reused the example check's embeddings
    assert shared(["also its document"]).shape == (1, 2) and encoded == queries  # kept from the last call


def test_example_proximity_with_the_real_base_model(minilm):
    """The demo's kept echo that shares no word with the example is caught; a claim about sleep
    keeps passing against its own abstract (about sleep too)."""
    from embed.generation.prompts import example_texts

    model = minilm
    docs = ["def _cleanup_tests():\n    import shutil\n    tmp = process.current_process()._config.get('tempdir')\n"
            "    if tmp:\n        shutil.rmtree(tmp)\n    _run_finalizers()",
            "Sleep deprivation impairs working memory in healthy young adults: after one night without sleep, "
            "accuracy on an n-back task fell by a fifth, and recovered after one night of normal sleep."]
    proximity = ExampleProximity(lambda qs: model.encode(qs, kind="query"), model.encode(docs, kind="document"),
                                 model.encode(example_texts(), kind="document"))
    queries = ["does testing with your own device improve your mental clarity", "clean up the temporary test directory",
               "one night of sleep loss impairs working memory"]
    assert proximity.closer_to_example(queries, [0, 0, 1]) == [True, False, False]


def test_human_claims_are_closer_to_their_abstract_than_to_the_example(scifact_dir, minilm):
    """The price of the proximity check on real queries: SciFact's first 150 judged test pairs (human
    claims against their abstracts). All 339 flag 3 (0.9%: one about insomnia, two about
    care delivery and statins); encoding them all costs minutes on 2 cores."""
    from embed.data import load_corpus, load_qrels, load_queries
    from embed.generation.prompts import example_texts

    corpus, queries = load_corpus(str(scifact_dir)), load_queries(str(scifact_dir))
    pairs = [(q, corpus.index[d]) for q, docs in load_qrels(str(scifact_dir / "qrels" / "test.tsv")).items()
             for d, score in docs.items() if score > 0 and q in queries and d in corpus.index][:150]
    model = minilm
    rows = sorted({row for _, row in pairs})
    emb = np.zeros((len(corpus), model.encode(["x"]).shape[1]), dtype=np.float32)
    emb[rows] = model.encode([corpus.doc_text(r) for r in rows], kind="document")
    proximity = ExampleProximity(lambda qs: model.encode(qs, kind="query"), emb,
                                 model.encode(example_texts(), kind="document"))
    flagged = proximity.closer_to_example([queries[q] for q, _ in pairs], [row for _, row in pairs])
    assert len(pairs) == 150 and sum(flagged) <= 1, [queries[q] for (q, _), f in zip(pairs, flagged) if f]


def test_the_generation_script_filters_with_the_prompts_worked_example():
    from embed.generation.prompts import example_texts

    assert tuple(example_texts()) == WORKED_EXAMPLE  # the example above is the one the prompts show


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


def test_dense_round_trip_with_the_real_base_model(minilm):
    model = minilm
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
