"""Data IO: every bad input names file, line and field, or is skipped and counted."""
import json
from collections import Counter

import pytest

from embed.data import (
    TrainExample,
    load_corpus,
    load_qrels,
    load_queries,
    pairs_from_beir,
    read_train_set,
    write_train_set,
)
from embed.errors import DataError
from embed.io import JsonlAppender


def corpus_file(tmp_path, lines):
    d = tmp_path / "beir"
    d.mkdir(exist_ok=True)
    (d / "corpus.jsonl").write_bytes(b"".join(x if isinstance(x, bytes) else (x + "\n").encode() for x in lines))
    return d


def test_corpus_reads_and_skips_empty(tmp_path):
    d = corpus_file(tmp_path, ['{"_id": "a", "title": "T", "text": "x"}', '{"_id": 7, "text": "y"}',
                               '{"_id": "e", "title": "", "text": "  "}'])
    c = load_corpus(str(d))
    assert c.ids == ["a", "7"] and c.doc_text(0) == "T x" and c.skipped == Counter(empty_text=1)


@pytest.mark.parametrize("lines,pattern", [
    (['{"_id": "a", "text": "x"}', '{"_id": "b", "text": '], r"corpus.jsonl:2: invalid JSON"),
    (['{"text": "x"}'], r"corpus.jsonl:1: missing field '_id'"),
    (['{"_id": "a", "text": "x"}', '{"_id": "a", "text": "y"}'], r"corpus.jsonl:2: field '_id': duplicate id 'a' \(first on line 1\)"),
    (['{"_id": "a", "text": ["x"]}'], r"corpus.jsonl:1: field 'text' must be a string"),
    ([b'{"_id": "a", "text": "\xff\xfe"}\n'], r"corpus.jsonl:1: not valid UTF-8"),
    (['["a"]'], r"corpus.jsonl:1: expected a JSON object"),
])
def test_corpus_errors_name_file_line_field(tmp_path, lines, pattern):
    with pytest.raises(DataError, match=pattern):
        load_corpus(str(corpus_file(tmp_path, lines)))


def test_qrels_unknown_ids_error_or_skip(tmp_path):
    d = corpus_file(tmp_path, ['{"_id": "a", "text": "x"}'])
    (d / "qrels").mkdir()
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tzzz\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:3: field 'corpus-id': unknown id 'zzz'"):
        load_qrels(d / "qrels" / "test.tsv", corpus_ids=["a"])
    skipped = Counter()
    assert load_qrels(d / "qrels" / "test.tsv", corpus_ids=["a"], on_unknown="skip", skipped=skipped) == {"q1": {"a": 1}}
    assert skipped["qrels_unknown_corpus"] == 1


def test_qrels_bad_row(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("query-id\tcorpus-id\tscore\nq1\ta\n")
    with pytest.raises(DataError, match=r"q.tsv:2: expected 3 tab-separated fields"):
        load_qrels(p)
    p.write_text("q1\ta\thigh\n")
    with pytest.raises(DataError, match=r"q.tsv:1: field 'score' must be a number"):
        load_qrels(p)


def test_queries_skip_empty_and_reject_duplicates(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "queries.jsonl").write_text('{"_id": "1", "text": "hi"}\n{"_id": "2", "text": ""}\n')
    skipped = Counter()
    assert load_queries(str(d), skipped=skipped) == {"1": "hi"} and skipped["empty_query"] == 1
    (d / "queries.jsonl").write_text('{"_id": "1", "text": "hi"}\n{"_id": "1", "text": "again"}\n')
    with pytest.raises(DataError, match=r"queries.jsonl:2: field '_id': duplicate id '1'"):
        load_queries(str(d))


def test_train_set_round_trip_and_validation(tmp_path):
    ex = TrainExample(query="q", pos_ids=["a"], pos_texts=["A"], neg_ids=["b"], neg_texts=["B"], neg_scores=[0.1])
    path = tmp_path / "train.jsonl"
    write_train_set(path, [ex, TrainExample(query=" ", pos_ids=["a"], pos_texts=["A"])])
    skipped = Counter()
    assert read_train_set(path, skipped=skipped) == [ex] and skipped["empty_query_or_positive"] == 1
    path.write_text(json.dumps({"query": "q", "pos_ids": ["a"], "pos_texts": []}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'pos_texts' must have one text per id"):
        read_train_set(path)
    path.write_text(json.dumps({"query": "q", "pos_ids": ["a"], "pos_texts": ["A"], "negs": []}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: unknown field 'negs'"):
        read_train_set(path)


def test_appender_cuts_torn_tail_and_skips_done(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "tor')  # killed mid-write
    app = JsonlAppender(path, key_fn=lambda r: r["id"])
    assert app.done == {1, 2}
    assert app.write([{"id": 2}, {"id": 3}, {"id": 4}]) == 2
    app.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_pairs_from_real_scifact(scifact_dir):
    examples = pairs_from_beir(str(scifact_dir), "train")
    assert len(examples) == 809 and all(e.pos_texts and e.query for e in examples)
