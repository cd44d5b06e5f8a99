"""The document-disjoint dev split (bench/disjoint_dev.py): no document is a positive on both sides,
linked queries stay together, and the written folder is a BEIR folder the pipeline reads."""
import importlib.util
import json
from pathlib import Path

import pytest

from embed.data import load_corpus, load_qrels, load_queries

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("disjoint_dev", REPO / "bench" / "disjoint_dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# q1-q2 share d1, q2-q3 share d2 (one group through q2); q4 alone; q5-q6 share d5; q7 alone.
JUDGED = {"q1": {"d1": 1}, "q2": {"d1": 1, "d2": 1}, "q3": {"d2": 1}, "q4": {"d4": 1},
          "q5": {"d5": 1, "d6": 1}, "q6": {"d5": 1}, "q7": {"d7": 1}}


def test_halves_share_no_positive_document_and_keep_groups_whole():
    bench = _bench()
    for seed in range(10):
        train, scored = bench.document_disjoint_halves(JUDGED, seed)
        assert sorted(train + scored) == sorted(JUDGED)
        train_docs = {d for q in train for d in JUDGED[q]}
        scored_docs = {d for q in scored for d in JUDGED[q]}
        assert not train_docs & scored_docs
        for group in ({"q1", "q2", "q3"}, {"q5", "q6"}):
            assert group <= set(train) or group <= set(scored)
        assert train and scored  # four groups, alternately assigned


def test_written_split_loads_as_a_beir_folder(tmp_path):
    bench = _bench()
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "corpus.jsonl", "w") as f:
        for d in ("d1", "d2", "d4", "d5", "d6", "d7"):
            f.write(json.dumps({"_id": d, "title": "", "text": f"text of {d}"}) + "\n")
    queries = {q: f"claim {q}" for q in JUDGED}
    train, scored = bench.document_disjoint_halves(JUDGED, 0)
    out = tmp_path / "split"
    assert bench.write_split(out, data, queries, JUDGED, train, scored)["train_half"] == len(train)

    assert load_corpus(str(out)).ids == ["d1", "d2", "d4", "d5", "d6", "d7"]
    assert load_queries(str(out)) == queries
    assert load_qrels(str(out / "qrels" / "train_half.tsv")) == {q: JUDGED[q] for q in train}
    assert load_qrels(str(out / "qrels" / "scored_half.tsv")) == {q: JUDGED[q] for q in scored}
    unlabelled = [json.loads(line) for line in open(out / "train_half_queries.jsonl")]
    assert [(r["_id"], r["text"]) for r in unlabelled] == [(q, queries[q]) for q in train]
    assert all(set(r) == {"_id", "text"} for r in unlabelled)


def test_difficulty_selection_keeps_the_lowest_or_highest_ranks_in_order():
    bench = _bench()
    ranks = [3, 1, 7, 1, 3, 2]                      # where the base model ranks the teacher's top document
    assert bench.by_difficulty(ranks, 2, "hardest") == [0, 2]       # 7, then the first of the 3s
    assert bench.by_difficulty(ranks, 3, "easiest") == [1, 3, 5]    # both 1s, then the 2
    assert bench.by_difficulty(ranks, 6, "easiest") == list(range(6))


def test_write_split_refuses_a_difficulty_selection_it_cannot_make(tmp_path, monkeypatch, capsys):
    bench = _bench()
    monkeypatch.setattr("sys.argv", ["disjoint_dev.py", "--write_split", str(tmp_path / "out"),
                                     "--max_train_queries", "10", "--select", "hardest"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2
    assert "--select hardest/easiest" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
