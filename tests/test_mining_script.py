"""scripts/mine_faiss.py end to end with a tiny random-init BERT teacher: outputs, resume, bad input, SciFact."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertModel

from embed.data import load_qrels, read_train_set
from embed.runtime import resolve_model
from tests.conftest import ddp_launcher

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
TOPICS = ["protein folding", "river delta", "solar panel", "tax policy", "jazz guitar", "glacier melt",
          "vaccine trial", "chess opening", "coral reef", "bread yeast"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A seeded random-init 2-layer BERT with the bundled MiniLM tokenizer, saved as a plain HF folder."""
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def beir(tmp_path):
    """40 documents on 10 topics (plus a verbatim copy of d0), 10 judged queries."""
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": TOPICS[i % 10], "text": f"{TOPICS[i % 10]} note {i} about {TOPICS[(i * 3) % 10]}"}
            for i in range(40)]
    docs.append({"_id": "copy_of_d0", "title": docs[0]["title"], "text": docs[0]["text"].upper()})
    write_rows(folder / "corpus.jsonl", docs)
    write_rows(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"what about {TOPICS[i]}?"} for i in range(10)])
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(10)) + "q1\td11\t1\n")
    return folder


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(tmp_path, model, corpus, **mine):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "seed": 1,
        "model": {"name_or_path": model, "max_length": 32, "query_max_length": 16},
        "data": {"corpus": str(corpus)},
        "mine": {"num_negatives": 3, "depth": 20, "batch_size": 4, "cache_dir": str(tmp_path / "cache"),
                 "generated": "qrels" not in mine, **mine},
    }))
    return path


def run_in_process(monkeypatch, *args):
    """The script's `run_main(main)` in this process (no interpreter start-up: torch imports are slow)."""
    spec = importlib.util.spec_from_file_location("mine_faiss", ROOT / "scripts" / "mine_faiss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["mine_faiss.py", *map(str, args)])
    module.run_main(module.main)


def check_train_set(path: Path, qrels: dict, num_negatives: int, summary: dict):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    read_train_set(path)  # the training stage's reader accepts it
    ids = [r["query_id"] for r in rows]
    assert len(ids) == len(set(ids)) == summary["queries_mined"]
    short = 0
    for r in rows:
        judged = {d for d, s in qrels.get(r["query_id"], {}).items() if s > 0}
        assert not set(r["neg_ids"]) & (judged | set(r["pos_ids"]))
        assert len(r["neg_ids"]) == len(set(r["neg_ids"])) == len(r["neg_scores"]) <= num_negatives
        pos_texts = {" ".join(t.split()).casefold() for t in r["pos_texts"]}
        assert not {" ".join(t.split()).casefold() for t in r["neg_texts"]} & pos_texts
        short += len(r["neg_ids"]) < num_negatives
    assert short == summary["queries_short_of_negatives"]
    return rows


def test_token_length_batches_give_the_same_embeddings(tiny_teacher, monkeypatch):
    from embed.mining.miner import encode_by_token_length
    from embed.modeling.model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(tiny_teacher, max_length=32)
    texts = [" ".join(["word"] * n) for n in (3, 40, 1, 17, 9, 25, 2, 30)]  # token order != input order
    expected = model.encode(texts, kind="document", batch_size=3)
    batches = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda chunk, **kw: batches.append(list(chunk)) or original(chunk, **kw))
    np.testing.assert_allclose(encode_by_token_length(model, texts, "document", 3), expected, atol=1e-5)
    assert [len(b) for b in batches] == [3, 3, 2]
    assert batches[0] == [texts[1], texts[7], texts[5]]  # the longest three (40, 30 -> 32 tokens; 25)


def test_same_query_text_under_two_ids_shares_exclusions():
    from embed.mining.inputs import MiningQuery, exclude_positives_of_same_text

    queries = [MiningQuery("a", "Is X true?", [1]), MiningQuery("b", "is  x TRUE?", [2]), MiningQuery("c", "other", [3])]
    exclude_positives_of_same_text(queries)
    assert [q.excluded_rows for q in queries] == [[2], [1], []]


# ---------------------------------------------------------------- judged pairs
def test_qrels_mining_writes_schema_summary_and_plot(tmp_path, tiny_teacher, beir, monkeypatch):
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train"))
    run = tmp_path / "run"
    summary = json.loads((run / "mine_summary.json").read_text())
    rows = check_train_set(run / "train.jsonl", load_qrels(beir / "qrels" / "train.tsv"), 3, summary)
    assert [r["query_id"] for r in rows] == [f"q{i}" for i in range(10)]
    assert next(r for r in rows if r["query_id"] == "q1")["pos_ids"] == ["d1", "d11"]
    q0 = next(r for r in rows if r["query_id"] == "q0")
    assert "copy_of_d0" not in q0["neg_ids"]
    assert summary["drops_per_rule"]["duplicate"] >= 1 and summary["drops_per_rule"]["positive"] >= 10
    assert summary["negatives_per_query_histogram"] and not summary["embedding_cache"]["hit"]
    assert (run / "mine_scores.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run / "train.jsonl.partial").exists() and not (run / "mine_stats.jsonl.partial").exists()

    # a second run reuses the cached corpus embeddings and gives the same rows
    (run / "train.jsonl").rename(run / "first.jsonl")
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train"))
    assert json.loads((run / "mine_summary.json").read_text())["embedding_cache"]["hit"]
    assert (run / "train.jsonl").read_text() == (run / "first.jsonl").read_text()


def test_a_named_teacher_replaces_the_model_being_trained(tmp_path, tiny_teacher, beir, monkeypatch):
    path = recipe(tmp_path, tiny_teacher, beir, qrels="train", teacher=tiny_teacher)
    run_in_process(monkeypatch, path, "--model.name_or_path", str(tmp_path / "not-loaded-by-mining"))
    summary = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    assert summary["teacher"] == tiny_teacher and summary["queries_mined"] == 10


def test_margin_off_keeps_more_than_margin_on(tmp_path, tiny_teacher, beir, monkeypatch):
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", relative_margin=None,
                                       rank_min=0, num_negatives=10))
    off = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", relative_margin=0.5,
                                       absolute_margin=0.0, num_negatives=10))
    on = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    assert off["drops_per_rule"]["relative_margin"] == 0
    assert on["drops_per_rule"]["relative_margin"] > 0
    assert on["negatives_per_query_mean"] < off["negatives_per_query_mean"]
    for _, row in enumerate(read_train_set(tmp_path / "run" / "train.jsonl")):
        ceiling = min(row.pos_scores) - abs(min(row.pos_scores)) * 0.5
        assert all(s <= ceiling + 1e-5 for s in row.neg_scores)


def test_hybrid_teacher_scores_are_cosine_mixed_with_relative_bm25(tmp_path, tiny_teacher, beir, monkeypatch):
    """mine.teacher_bm25_weight: every written score is (1 - w) x the dense teacher's + w x relative BM25."""
    from embed.data import load_corpus
    from embed.retrieval.bm25_index import BM25Index

    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", relative_margin=None,
                                       retrievers=["dense"]))
    dense = {r.query_id: r for r in read_train_set(tmp_path / "run" / "train.jsonl")}
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", relative_margin=None,
                                       teacher_bm25_weight=0.4, retrievers=["dense"]))
    summary = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    assert summary["teacher_bm25_weight"] == 0.4 and summary["retrievers"] == ["dense"]
    corpus = load_corpus(str(beir))
    lexical = BM25Index([corpus.doc_text(i) for i in range(len(corpus))])
    for row in read_train_set(tmp_path / "run" / "train.jsonl"):
        plain = dense[row.query_id]
        assert row.pos_ids == plain.pos_ids and row.neg_ids == plain.neg_ids  # same candidates, margin off
        rel = lexical.relative_scores(row.query, [corpus.index[d] for d in row.pos_ids + row.neg_ids])
        mixed = [0.6 * s + 0.4 * r for s, r in zip(plain.pos_scores + plain.neg_scores, rel)]
        assert row.pos_scores + row.neg_scores == pytest.approx(mixed, abs=1e-5)
        assert rel.max() > 0  # every query shares a topic word with its positive


def test_teacher_candidates_list_positives_then_the_best_scored_others(tmp_path, tiny_teacher, beir, monkeypatch):
    """mine.teacher_candidates: K: each row lists its positives (with their scores), then the K
    best-scored other documents of the pool, best first; the negatives are among them with the
    same scores (no margin rule, top sampling: they are the pool's best non-positives too)."""
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", relative_margin=None,
                                       teacher_bm25_weight=0.3, teacher_candidates=5))
    rows = read_train_set(tmp_path / "run" / "train.jsonl")
    assert rows
    for row in rows:
        n_pos = len(row.pos_ids)
        assert row.cand_ids[:n_pos] == row.pos_ids and row.cand_scores[:n_pos] == row.pos_scores
        others = dict(zip(row.cand_ids[n_pos:], row.cand_scores[n_pos:]))
        assert len(others) == 5 and not set(others) & set(row.pos_ids)
        assert row.cand_scores[n_pos:] == sorted(row.cand_scores[n_pos:], reverse=True)
        for neg, score in zip(row.neg_ids, row.neg_scores):
            if neg in others:
                assert others[neg] == pytest.approx(score, abs=1e-6)
            else:  # a negative the pool ranked lower must score no higher than the listed ones
                assert score <= min(others.values()) + 1e-6


# ---------------------------------------------------------------- generated queries + bad input
def test_generated_queries_skip_and_count_bad_rows(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_rows(run / "queries.jsonl", [
        {"doc_id": "d0", "sample": 0, "query": "protein folding question", "kept": True},
        {"doc_id": "d0", "sample": 1, "query": "dropped by a filter", "kept": False},
        {"doc_id": "d2", "sample": 0, "query": "   ", "kept": True},
        {"doc_id": "missing_doc", "sample": 0, "query": "orphan", "kept": True},
        {"doc_id": "d3", "sample": 0, "query": "tax policy question", "kept": True},
    ])
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir))
    summary = json.loads((run / "mine_summary.json").read_text())
    assert summary["queries_mined"] == 2
    assert summary["queries_skipped"] == {"empty_query": 1, "generated_not_kept": 1, "positive_not_in_corpus": 1}
    assert "missing_doc" in capsys.readouterr().out
    rows = check_train_set(run / "train.jsonl", {}, 3, summary)
    assert [(r["query_id"], r["pos_ids"], r["source"]) for r in rows] == [("d0#0", ["d0"], "generated"),
                                                                          ("d3#0", ["d3"], "generated")]


def test_generated_and_judged_queries_mine_into_one_set_tagged_by_source(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    """mine.generated + mine.qrels: one train.jsonl, each row's `source` saying which input it came from
    (the few-label recipe's stages pick by it); a query id in both inputs is an error naming the file."""
    run = tmp_path / "run"
    run.mkdir()
    write_rows(run / "queries.jsonl", [{"doc_id": "d5", "sample": 0, "query": "protein folding question", "kept": True}])
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", generated=True))
    summary = json.loads((run / "mine_summary.json").read_text())
    rows = check_train_set(run / "train.jsonl", load_qrels(beir / "qrels" / "train.tsv"), 3, summary)
    sources = Counter(r["source"].split(":")[0] for r in rows)
    assert sources == {"generated": 1, "qrels": 10} and summary["queries_mined"] == 11

    write_rows(run / "queries.jsonl", [{"doc_id": "d5", "query_id": "q3", "query": "clash", "kept": True}])
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", generated=True))
    assert exit_info.value.code == 2
    assert "train.tsv: query id 'q3' is also a generated query's id" in capsys.readouterr().err


def test_unjudged_queries_take_the_teachers_best_document_as_positive(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    """mine.unjudged_queries: queries without judgments; each row's positive is the document the teacher
    (here the dense one) scores highest in the corpus, recomputed here with transformers alone; the
    negatives and the other candidates score below it; rows say where they came from."""
    from transformers import AutoModel

    from embed.data import load_corpus

    log = tmp_path / "log.jsonl"
    write_rows(log, [{"_id": f"u{i}", "text": f"{TOPICS[i]} findings"} for i in range(4)] + [{"_id": "empty", "text": " "}])
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, generated=False, unjudged_queries=str(log),
                                       retrievers=["dense"], teacher_candidates=3, relative_margin=None))
    summary = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    assert summary["queries_mined"] == 4 and summary["queries_skipped"] == {"empty_query": 1}
    rows = read_train_set(tmp_path / "run" / "train.jsonl")
    assert {r.source for r in rows} == {f"unjudged:{log}"}

    corpus = load_corpus(str(beir))
    tokenizer, bert = AutoTokenizer.from_pretrained(tiny_teacher), AutoModel.from_pretrained(tiny_teacher).eval()

    def embed(texts, max_length):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    cosine = embed([r.query for r in rows], 16) @ embed([corpus.doc_text(i) for i in range(len(corpus))], 32).T
    for row, scores in zip(rows, cosine):
        assert len(row.pos_ids) == 1
        assert scores[corpus.index[row.pos_ids[0]]] >= scores.max() - 1e-3  # the corpus' best (fp16 cache)
        assert row.pos_ids[0] not in row.neg_ids and row.neg_ids
        assert max(row.neg_scores + row.cand_scores[1:]) <= row.pos_scores[0] + 1e-6
        assert row.cand_ids[0] == row.pos_ids[0] and row.pos_ids[0] not in row.cand_ids[1:]

    write_rows(log, [{"_id": "q3", "text": "clash"}])
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels="train", unjudged_queries=str(log)))
    assert exit_info.value.code == 2
    assert "log.jsonl: query id 'q3' is also a qrels query's id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, generated=False, unjudged_queries=str(log),
                                           retrievers=["bm25"]))
    assert "'mine.unjudged_queries' needs 'dense' in mine.retrievers" in capsys.readouterr().err


def test_nothing_to_mine_is_a_config_error(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, generated=False))
    assert exit_info.value.code == 2
    assert "'mine.qrels' and 'mine.unjudged_queries' (empty) leave nothing to mine" in capsys.readouterr().err


def test_qrels_naming_a_missing_document_or_query_text_is_counted(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    write_rows(beir / "queries.jsonl", [{"_id": f"q{i}", "text": "" if i == 2 else f"about {TOPICS[i]}"} for i in range(10)])
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq0\tghost\t1\nq1\tghost\t1\n"
                                              "q2\td2\t1\nq3\td3\t0\nq4\td4\t2\nq99\td5\t1\n")
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir, qrels=str(beir / "qrels" / "train.tsv")))
    summary = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    assert summary["queries_mined"] == 2  # q0 (its real positive) and q4
    assert summary["queries_skipped"] == {"empty_query": 1, "positive_not_in_corpus": 2, "query_without_positive_in_corpus": 1,
                                          "query_without_relevant_judgement": 1, "query_without_text": 2}
    assert "2 judged positive(s) are not in the corpus" in capsys.readouterr().out


def test_malformed_input_is_one_line_error(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_rows(run / "queries.jsonl", [{"doc_id": "d0", "query": "fine"}, {"doc_id": 7, "query": "bad id"}])
    for args, message in (
        ([recipe(tmp_path, tiny_teacher, beir)], f"error: {run / 'queries.jsonl'}:2: field 'doc_id' must be a string"),
        ([recipe(tmp_path, tiny_teacher, beir), "--mine.depth", "2"], "error: key 'mine.depth' (2) must be >= mine.num_negatives (3)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_in_process(monkeypatch, *args)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]


# ---------------------------------------------------------------- kill mid-run, rerun
KILLER = """
import os, signal, sys, runpy
from embed.mining import output as mining_output
original, calls = mining_output.ResumableOutput.write, [0]
def write_then_die(self, mined, corpus):
    calls[0] += 1
    if calls[0] == 2:  # second batch: stats on disk, then half a row, then SIGKILL
        self.stats.write(mining_output.to_stats_row(m) for m in mined)
        self.rows._file.write('{"query": "torn')
        self.rows._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, mined, corpus)
mining_output.ResumableOutput.write = write_then_die
sys.argv = ["mine_faiss.py", *sys.argv[1:]]
runpy.run_path("scripts/mine_faiss.py", run_name="__main__")
"""


def test_kill_mid_run_then_rerun_has_no_duplicates_or_gaps(tmp_path, tiny_teacher, beir, monkeypatch, capsys):
    reference = tmp_path / "reference"
    reference.mkdir()
    run_in_process(monkeypatch, recipe(reference, tiny_teacher, beir, qrels="train", sampling="random"))
    args = [recipe(tmp_path, tiny_teacher, beir, qrels="train", sampling="random")]
    proc = subprocess.run([sys.executable, "-c", KILLER, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "run"
    partial = (run / "train.jsonl.partial").read_text()
    assert partial.count("\n") == 4 and partial.endswith('{"query": "torn')  # one batch of 4 + a torn line
    assert not (run / "train.jsonl").exists()
    capsys.readouterr()
    run_in_process(monkeypatch, *args)
    out = capsys.readouterr().out
    assert "resuming: 4 of 10 queries already mined" in out
    assert (run / "train.jsonl").read_text() == (reference / "run" / "train.jsonl").read_text()
    summary = json.loads((run / "mine_summary.json").read_text())
    ref_summary = json.loads((reference / "run" / "mine_summary.json").read_text())
    assert summary["drops_per_rule"] == ref_summary["drops_per_rule"] and summary["resumed_queries"] == 4


# ---------------------------------------------------------------- real data
@pytest.mark.slow  # ~60 s on 2 cores: encodes SciFact's 5,183 documents
@pytest.mark.skipif(not SCIFACT.is_dir(), reason="../shared/data/scifact is absent")
def test_scifact_train_pairs_every_row_full_or_counted_short(tmp_path, tiny_teacher, monkeypatch):
    # the tiny teacher keeps this fast; the bundled MiniLM run is in bench/bench_mine.py and the report
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, SCIFACT, qrels="train", num_negatives=8,
                                       depth=50, batch_size=512, encode_batch_size=128))
    summary = json.loads((tmp_path / "run" / "mine_summary.json").read_text())
    qrels = load_qrels(SCIFACT / "qrels" / "train.tsv")
    assert summary["queries_mined"] == len(qrels) == 809
    check_train_set(tmp_path / "run" / "train.jsonl", qrels, 8, summary)
    assert sum(summary["negatives_per_query_histogram"].values()) == 809
    assert summary["negatives_that_are_positives"] == 0


# ---------------------------------------------------------------- sharded encoding under accelerate launch
@pytest.mark.slow  # two CPU processes (gloo): ~1 min of interpreter start-up on 2 shared cores
def test_two_process_launch_shards_encoding_and_matches_one_process(tmp_path, tiny_teacher, beir, monkeypatch):
    one = tmp_path / "one"
    one.mkdir()
    run_in_process(monkeypatch, recipe(one, tiny_teacher, beir, qrels="train", cache_chunk_size=8))
    two = tmp_path / "two"
    two.mkdir()
    proc = subprocess.run([*ddp_launcher(), str(ROOT / "scripts" / "mine_faiss.py"),
                           str(recipe(two, tiny_teacher, beir, qrels="train", cache_chunk_size=8))],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 1: chunk 2/6 encoded" in proc.stdout and "rank 0: chunk 1/6 encoded" in proc.stdout  # 41 docs, 8 a chunk
    [entry_one] = (one / "cache").iterdir()
    [entry_two] = (two / "cache").iterdir()
    assert entry_one.name == entry_two.name  # same teacher + corpus -> same key
    np.testing.assert_allclose(np.load(entry_one / "embeddings.npy"), np.load(entry_two / "embeddings.npy"), atol=2e-3)
    assert (two / "run" / "train.jsonl").read_text() == (one / "run" / "train.jsonl").read_text()


def test_cloze_queries_are_mined_with_their_own_positive_text(tmp_path, tiny_teacher, beir, monkeypatch):
    """The generation stage's cloze file is read beside queries.jsonl; its positive is the document
    less the query sentence, never the full text, and its source document is still excluded."""
    run = tmp_path / "run"
    run.mkdir()
    write_rows(run / "queries.jsonl", [{"doc_id": "d0", "sample": 0, "query": "protein folding question", "kept": True}])
    write_rows(run / "cloze_queries.jsonl", [
        {"doc_id": "d5", "query_id": "cloze:d5", "query": "a sentence of d5", "query_type": "cloze", "kept": True,
         "positive_text": "d5 without that sentence"}])
    run_in_process(monkeypatch, recipe(tmp_path, tiny_teacher, beir))
    summary = json.loads((run / "mine_summary.json").read_text())
    rows = {r["query_id"]: r for r in check_train_set(run / "train.jsonl", {}, 3, summary)}
    assert set(rows) == {"d0#0", "cloze:d5"}
    assert rows["cloze:d5"]["pos_ids"] == ["d5"] and rows["cloze:d5"]["pos_texts"] == ["d5 without that sentence"]
    assert rows["cloze:d5"]["source"] == "cloze" and "d5" not in rows["cloze:d5"]["neg_ids"]
    assert rows["d0#0"]["pos_texts"] == ["protein folding protein folding note 0 about protein folding"]  # title + text


# ---------------------------------------------------------------- the score plot
def test_margin_scatter_plots_each_negative_against_its_positive(tmp_path, monkeypatch):
    from embed.mining import output
    from embed.mining.negative_filters import NegativeRules

    figures = []
    original = output.save_figure
    monkeypatch.setattr(output, "save_figure", lambda fig, path, **kw: figures.append(fig) or original(fig, path, **kw))
    rows = [
        {"pos_scores": [0.8, 0.9], "neg_scores": [0.7, 0.5], "source": "generated"},  # x = least similar positive
        {"pos_scores": [0.6], "neg_scores": [0.4], "source": "qrels:train.tsv"},
        {"pos_scores": None, "neg_scores": [0.3], "source": "generated"},  # no teacher score: not plotted
        {"pos_scores": [0.7], "neg_scores": [], "source": "generated"},  # no negative: nothing to plot
    ]
    path = tmp_path / "mine_scores.png"
    output.plot_margin_scatter(path, rows, NegativeRules(relative_margin=0.05, absolute_margin=0.15), "teacher")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    points = {c.get_label().split(" (")[0]: c.get_offsets().tolist() for c in ax.collections}
    assert points == {"generated": [[0.8, 0.7], [0.8, 0.5]], "qrels": [[0.6, 0.4]]}
    line = next(ln for ln in ax.lines if ln.get_label().startswith("margin rule"))
    x, y = line.get_data()
    # the stricter rule: positive - 0.15 (absolute) is below positive x 0.95 (relative) for these scores
    np.testing.assert_allclose(y, x - 0.15)
    assert x.min() == pytest.approx(0.6) and x.max() == pytest.approx(0.8)  # over the positives


def test_margin_scatter_without_margin_rules_draws_no_margin_line(tmp_path, monkeypatch):
    from embed.mining import output
    from embed.mining.negative_filters import NegativeRules

    figures = []
    original = output.save_figure
    monkeypatch.setattr(output, "save_figure", lambda fig, path, **kw: figures.append(fig) or original(fig, path, **kw))
    output.plot_margin_scatter(tmp_path / "p.png", [{"pos_scores": [0.5], "neg_scores": [0.6]}],
                               NegativeRules(relative_margin=None, absolute_margin=None), "no margins")
    labels = [ln.get_label() for ln in figures[0].axes[0].lines]
    assert labels == ["negative = positive"]
    output.plot_margin_scatter(tmp_path / "empty.png", [], NegativeRules(), "nothing mined")  # still a figure
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"
