"""Evaluation through mteb: local BEIR task metrics, encoder adapter, cache identity, outputs of a run.

The toy folder tests/fixtures/tiny_beir has 5 documents and 3 judged queries; a bag-of-words
encoder (exact, deterministic) makes every rank computable by hand. The real-model path
(EmbeddingModel on SciFact = 64.51) is checked by the done-when command in the report.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_tiny_bert
from torch import nn

from embed.errors import ConfigError, DataError
from embed.evaluation.leaderboard import prepare_submission, push_to_hub, results_table
from embed.evaluation.mteb_eval import (
    LocalBEIRTask,
    MTEBEncoder,
    build_model_meta,
    evaluate_beir,
    evaluate_model,
    model_output_fingerprint,
    resolve_eval_tasks,
    truncate_and_normalize,
)
from embed.modeling.model import EmbeddingModel, EncoderSettings

TINY_BEIR = REPO / "tests" / "fixtures" / "tiny_beir"


class BagOfWords(nn.Module):
    """Normalised word counts over a 6-word vocabulary, with EmbeddingModel's encode signature."""

    VOCAB = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]

    def __init__(self):
        super().__init__()
        self.settings = EncoderSettings(query_prompt="query: ")
        self.unused = nn.Parameter(torch.zeros(1))  # mteb's ModelMeta counts parameters
        self.calls: list[tuple[str, list[str]]] = []

    normalize = property(lambda self: True)
    query_prompt = property(lambda self: self.settings.query_prompt)

    def encode(self, texts, kind="document", batch_size=64, show_progress=False):
        self.calls.append((kind, list(texts)))
        out = np.zeros((len(texts), len(self.VOCAB)), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                if word in self.VOCAB:
                    out[i, self.VOCAB.index(word)] += 1
        return out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)


# ---------------------------------------------------------------- the local task, by hand
def test_local_task_metrics_match_hand_computation():
    model = BagOfWords()
    scores = evaluate_beir(model, str(TINY_BEIR), split="test")
    # Documents (title + text): d1 alpha alpha beta | d2 beta gamma | d3 gamma gamma delta |
    # d4 delta epsilon | d5 alpha zeta zeta.  Cosine ranks:
    # q1 "alpha":             d1 (.894) > d5 (.447) > rest 0;   relevant d5 (1)        -> rank 2
    # q2 "gamma gamma delta": d3 (1.0) > d2 (.632) > d4 (.316); relevant d3 (2), d4 (1) -> ranks 1, 3
    # q3 "epsilon":           d4 (.707) > rest 0;               relevant d4 (1)        -> rank 1
    # q4 has no judgements in qrels/test.tsv, so it is not evaluated.
    # nDCG (trec_eval: linear gain, log2(rank + 1) discount):
    ndcg_q1 = 1 / math.log2(3)
    ndcg_q2 = (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    ndcg_q3 = 1.0
    assert scores["ndcg_at_10"] == pytest.approx((ndcg_q1 + ndcg_q2 + ndcg_q3) / 3, abs=1e-5)
    assert scores["main_score"] == scores["ndcg_at_10"]
    assert scores["ndcg_at_1"] == pytest.approx((0 + 1 + 1) / 3, abs=1e-5)
    assert scores["recall_at_1"] == pytest.approx((0 + 0.5 + 1) / 3, abs=1e-5)
    assert scores["recall_at_3"] == pytest.approx(1.0)
    assert scores["mrr_at_10"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-5)
    # mteb asked for the 3 judged queries as queries and the 5 documents (title joined) as documents
    kinds = {kind: texts for kind, texts in model.calls if len(texts) > 1}
    assert sorted(kinds["query"]) == ["alpha", "epsilon", "gamma gamma delta"]
    assert "alpha alpha beta" in kinds["document"] and len(kinds["document"]) == 5


def test_folder_without_qrels_split_is_a_one_line_error(tmp_path):
    shutil.copytree(TINY_BEIR, tmp_path / "beir")
    with pytest.raises(DataError, match=r"qrels/dev.tsv: file not found") as e:
        LocalBEIRTask(str(tmp_path / "beir"), split="dev")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("row, field", [("q1\td9\t1", "corpus-id"), ("q9\td1\t1", "query-id")])
def test_qrels_with_unknown_ids_is_an_error_naming_line_and_field(tmp_path, row, field):
    shutil.copytree(TINY_BEIR, tmp_path / "beir")
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\n{row}\n")
    with pytest.raises(DataError, match=rf"test.tsv:2: field '{field}': unknown id"):
        evaluate_beir(BagOfWords(), str(tmp_path / "beir"))


def _beir_with_an_empty_judged_document(folder):
    """tiny_beir plus d6 with empty title and text, judged relevant for q3 (as in a classic collection)."""
    shutil.copytree(TINY_BEIR, folder)
    with open(folder / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "d6", "title": "", "text": ""}) + "\n")
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("q3\td6\t1\n")
    return folder


def test_corpus_reader_keeps_empty_documents_for_evaluation_and_counts_them(tmp_path):
    from embed.data import load_corpus

    folder = _beir_with_an_empty_judged_document(tmp_path / "beir")
    for_generation = load_corpus(str(folder))
    for_evaluation = load_corpus(str(folder), keep_empty=True)
    assert "d6" not in for_generation.index and for_generation.skipped["empty_text"] == 1
    assert for_evaluation.ids[-1] == "d6" and for_evaluation.doc_text(5) == ""
    assert for_evaluation.skipped["empty_text"] == 1


def test_empty_document_judged_in_the_qrels_is_ranked_as_mteb_does(tmp_path, capsys):
    """An empty document is a document: the evaluation ranks it instead of failing on its judgement."""

    class EmptyAsEpsilon(BagOfWords):  # the empty text embeds as "epsilon", so q3's ranks are known
        def encode(self, texts, **kwargs):
            texts = list(texts)
            out = super().encode(["epsilon" if not t.strip() else t for t in texts], **kwargs)
            self.calls[-1] = (kwargs.get("kind"), texts)
            return out

    folder = _beir_with_an_empty_judged_document(tmp_path / "beir")
    model = EmptyAsEpsilon()
    scores = evaluate_beir(model, str(folder))
    # q1, q2 as in test_local_task_metrics_match_hand_computation (d6 scores 0 for them);
    # q3 "epsilon": d6 (1.0) > d4 (.707), both relevant -> the ideal ranking, nDCG 1
    ndcg_q1 = 1 / math.log2(3)
    ndcg_q2 = (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert scores["ndcg_at_10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 1.0) / 3, abs=1e-5)
    documents = next(texts for kind, texts in model.calls if kind == "document" and len(texts) > 4)
    assert len(documents) == 6 and any(not t.strip() for t in documents)
    assert "1 document(s) with empty title and text" in capsys.readouterr().out


def test_script_evaluates_a_corpus_with_an_empty_judged_document(tmp_path, monkeypatch, tiny_bert_dir):
    folder = _beir_with_an_empty_judged_document(tmp_path / "beir")
    _run_script(monkeypatch, "--model", tiny_bert_dir, "--data", folder, "--run_dir", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    expected = evaluate_beir(EmbeddingModel.from_pretrained(str(tiny_bert_dir)), str(folder))["ndcg_at_10"]
    assert summary["ndcg_at_10"]["beir"]["model"] == pytest.approx(expected)


def test_unknown_target_name_suggests_the_mteb_task():
    with pytest.raises(DataError, match=r"'SciFakt' is neither a BEIR folder.*Did you mean: 'SciFact'"):
        resolve_eval_tasks(["SciFakt"])


def test_benchmark_name_expands_to_its_tasks():
    names = [t.metadata.name for t in resolve_eval_tasks(["MTEB(Medical, v1)"])]
    assert {"SciFact", "NFCorpus", "TRECCOVID"} <= set(names)


def test_mteb_task_without_hub_access_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable as on a machine without network
    task = resolve_eval_tasks(["SciFact"])[0]
    with pytest.raises(DataError, match=r"MTEB task 'SciFact' needs its data from the Hugging Face hub.*--data DIR"):
        evaluate_model(BagOfWords(), [task], name="bow", revision="r1")


# ---------------------------------------------------------------- the encoder adapter
@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory):
    folder = make_tiny_bert(tmp_path_factory.mktemp("prompted") / "model", seed=3, query_prompt="query: ")
    return EmbeddingModel.from_pretrained(str(folder))


def test_adapter_applies_the_query_prompt_to_queries_only(prompted_model):
    from mteb.types import PromptType

    texts = ["gamma delta", "a longer text about epsilon"]
    meta = build_model_meta(prompted_model, "m", "r")
    adapter = MTEBEncoder(prompted_model, meta)
    batches = [{"text": texts[:1]}, {"text": texts[1:]}]
    kw = dict(task_metadata=None, hf_split="test", hf_subset="default")
    queries = adapter.encode(batches, prompt_type=PromptType.query, **kw)
    documents = adapter.encode(batches, prompt_type=PromptType.document, **kw)
    np.testing.assert_allclose(queries, prompted_model.encode(texts, kind="query"), atol=1e-6)
    np.testing.assert_allclose(documents, prompted_model.encode(texts, kind="document"), atol=1e-6)
    assert not np.allclose(queries, documents, atol=1e-3)  # the prompt changed the query vectors


def test_matryoshka_adapter_truncates_and_renormalises(prompted_model):
    from mteb.types import PromptType

    texts = ["alpha beta", "gamma"]
    adapter = MTEBEncoder(prompted_model, build_model_meta(prompted_model, "m", "r", dim=8), dim=8)
    out = adapter.encode([{"text": texts}], task_metadata=None, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.document)
    full = prompted_model.encode(texts)
    assert out.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(truncate_and_normalize(full, 32), full, atol=1e-6)


# ---------------------------------------------------------------- cache identity (FIELD.md's trap)
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    # seeds chosen so the two random models rank the toy folder differently
    return [EmbeddingModel.from_pretrained(str(make_tiny_bert(root / name / "model", seed=seed)))
            for name, seed in (("a", 0), ("b", 2))]


def test_two_models_in_one_cache_folder_each_get_their_own_scores(two_models, tmp_path):
    a, b = two_models
    task = [LocalBEIRTask(str(TINY_BEIR))]
    uncached = [evaluate_beir(m, str(TINY_BEIR))["ndcg_at_10"] for m in (a, b)]
    assert uncached[0] != uncached[1]
    cache = tmp_path / "eval"
    # the same name on purpose: only the weight fingerprint (revision) tells them apart
    got = [evaluate_model(m, task, name="org/same-name", results_dir=cache)["tiny_beir"]["ndcg_at_10"]
           for m in (a, b)]
    assert got == pytest.approx(uncached)
    revisions = sorted(p.name for p in (cache / "results" / "org__same-name").iterdir())
    assert revisions == sorted([model_output_fingerprint(a), model_output_fingerprint(b)])
    for rev in revisions:
        assert (cache / "results" / "org__same-name" / rev / "local-tiny_beir.json").is_file()
    # the trap itself: model b filed under a's revision is answered from a's cache entry
    trapped = evaluate_model(b, task, name="org/same-name", revision=model_output_fingerprint(a), results_dir=cache)
    assert trapped["tiny_beir"]["ndcg_at_10"] == pytest.approx(uncached[0])


def test_fingerprint_is_stable_across_loads_and_tracks_settings(tmp_path):
    folder = str(make_tiny_bert(tmp_path / "model", seed=0))  # no pooler weights: BERT re-inits them per load
    first, second = (EmbeddingModel.from_pretrained(folder) for _ in range(2))
    assert model_output_fingerprint(first) == model_output_fingerprint(second)  # a rerun finds its cached results
    prompted = EmbeddingModel.from_pretrained(folder, query_prompt="query: ")
    assert model_output_fingerprint(prompted) != model_output_fingerprint(first)


def test_changed_folder_is_not_answered_from_the_cache(tmp_path):
    shutil.copytree(TINY_BEIR, tmp_path / "beir")
    kwargs = dict(name="bow", revision="r1", results_dir=tmp_path / "eval")
    before = evaluate_model(BagOfWords(), [LocalBEIRTask(str(tmp_path / "beir"))], **kwargs)["beir"]
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    after = evaluate_model(BagOfWords(), [LocalBEIRTask(str(tmp_path / "beir"))], **kwargs)["beir"]
    assert before["ndcg_at_10"] < 1.0 and after["ndcg_at_10"] == pytest.approx(1.0)  # q1 -> d1 is rank 1


# ---------------------------------------------------------------- leaderboard files
def test_results_table_has_delta_and_published_references_with_source():
    table = results_table({"base": {"scifact": 0.6451}, "trained": {"scifact": 0.7012}},
                          {"base": "sentence-transformers/all-MiniLM-L6-v2", "trained": "local/run"}, {"scifact": "test"})
    header, _, row = table.splitlines()[:3]
    assert header.startswith("| dataset | split | base | trained | Δ | BM25s | all-MiniLM-L6-v2")
    assert row.startswith("| scifact | test | 64.51 | 70.12 | +5.61 | 68.7 | 64.5 | 71.3 | 74.4 | 76.4 | 80.1 |")
    assert "FIELD.md" in table and "not zero-shot" in table


def test_push_to_hub_refuses_without_a_token(tmp_path):
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        push_to_hub(tmp_path, "user/model", token=None)


def test_submission_keeps_official_tasks_only(tmp_path):
    src = tmp_path / "eval" / "results" / "user__m" / "rev"
    src.mkdir(parents=True)
    for name in ("SciFact.json", "local-scifact.json", "model_meta.json"):
        (src / name).write_text("{}")
    copied = prepare_submission(tmp_path / "eval", "user/m", "rev", tmp_path / "sub", {"SciFact"})
    assert sorted(p.name for p in copied) == ["SciFact.json", "model_meta.json"]
    assert prepare_submission(tmp_path / "eval", "user/m", "rev", tmp_path / "sub2", set()) == []


# ---------------------------------------------------------------- the script
def _load_script():
    spec = importlib.util.spec_from_file_location("eval_mteb", REPO / "scripts" / "eval_mteb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(monkeypatch, *argv):
    from embed.cli import run_main

    monkeypatch.setattr(sys, "argv", ["eval_mteb.py", *map(str, argv)])
    run_main(_load_script().main)


def test_trained_run_writes_table_chart_summary_and_card(tmp_path, monkeypatch, capsys):
    base = make_tiny_bert(tmp_path / "base" / "model", seed=0)
    run_dir = tmp_path / "run"
    make_tiny_bert(run_dir / "model", seed=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "model": {"name_or_path": str(base), "matryoshka_dims": [16]},
        "data": {"eval": [str(TINY_BEIR)], "eval_split": "test"}, "eval": {"model_name": "user/tiny-domain"}}))
    _run_script(monkeypatch, recipe)
    eval_dir = run_dir / "eval"
    table = (eval_dir / "results.md").read_text()
    assert "| dataset | split | base | trained | Δ |" in table
    assert "| tiny_beir | test |" in table and "| tiny_beir (16d) | test |" in table
    assert (eval_dir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    assert not (eval_dir / "eval_summary.json").exists()  # written once, where every stage writes its summary
    assert 0 < summary["peak_rss_gb"] < 64  # the whole process tree, as every stage records it
    ndcg = summary["ndcg_at_10"]["tiny_beir"]
    for role, folder in (("base", base), ("trained", run_dir / "model")):
        expected = evaluate_beir(EmbeddingModel.from_pretrained(str(folder)), str(TINY_BEIR))["ndcg_at_10"]
        assert ndcg[role] == pytest.approx(expected)
    assert summary["models"]["trained"]["name"] == "user/tiny-domain"
    assert set(summary["matryoshka_main_score"]["16"]["tiny_beir"]) == {"trained"}
    card = (run_dir / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "- mteb" in card and "ndcg_at_10" in card
    assert sorted(p.name for p in (eval_dir / "results").iterdir()) == ["local__base", "user__tiny-domain"]
    assert not (eval_dir / "submission").exists()  # a local folder is not a leaderboard task
    assert "| tiny_beir | test |" in capsys.readouterr().out


def test_one_model_without_recipe(tmp_path, monkeypatch, tiny_bert_dir):
    _run_script(monkeypatch, "--model", tiny_bert_dir, "--data", TINY_BEIR, "--run_dir", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    assert list(summary["ndcg_at_10"]["tiny_beir"]) == ["model"]
    assert (tmp_path / "run" / "eval" / "results.md").is_file()
    assert (tmp_path / "run" / "eval" / "scores.png").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "eval_config.yaml").read_text())
    assert saved["data"]["eval"] == [str(TINY_BEIR)] and saved["model"]["name_or_path"] == str(tiny_bert_dir)


def test_script_reports_missing_qrels_as_one_line(tmp_path, monkeypatch, capsys, tiny_bert_dir):
    shutil.copytree(TINY_BEIR, tmp_path / "beir")
    (tmp_path / "beir" / "qrels" / "test.tsv").unlink()
    with pytest.raises(SystemExit) as e:
        _run_script(monkeypatch, "--model", tiny_bert_dir, "--data", tmp_path / "beir", "--run_dir", tmp_path / "run")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "qrels/test.tsv: file not found" in err and "\n" not in err


def test_push_without_token_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"eval": [str(TINY_BEIR)]}}))
    with pytest.raises(SystemExit):
        _run_script(monkeypatch, recipe, "--push_to_hub", "user/model")
    assert "HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_card_asks_for_trust_remote_code_only_for_this_packages_modules(tmp_path):
    """A latent-attention model names `embed.modeling.latent_attention.LatentAttentionST` in modules.json;
    its card spells out the opt-in and why. Every other card loads with the flag off."""
    from embed.evaluation.leaderboard import model_card
    from embed.modeling.model import LATENT_ATTENTION_ST, package_modules

    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LatentAttention", "type": LATENT_ATTENTION_ST}]))
    assert package_modules(tmp_path) == (LATENT_ATTENTION_ST,)
    assert package_modules(tmp_path / "missing") == ()
    settings = EncoderSettings(query_prompt="query: ")
    plain = model_card("user/m", "base/m", {}, [], "", load_path="user/m", settings=settings)
    custom = model_card("user/m", "base/m", {}, [], "", load_path="user/m", settings=settings,
                        package_modules=(LATENT_ATTENTION_ST,))
    assert 'SentenceTransformer("user/m")' in plain and "trust_remote_code" not in plain
    assert 'SentenceTransformer("user/m", trust_remote_code=True)' in custom and LATENT_ATTENTION_ST in custom
