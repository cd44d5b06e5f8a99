"""scripts/eval_mteb.py on a trained run, as a user runs it: the columns it compares and what it writes.

One module-scoped run of the script (tiny random BERTs, the toy BEIR folder) is read by several
tests: Matryoshka dims up to the full width, the base model under its own settings, the summary
written once, the per-query chart, and the model card's usage snippet executed as printed. The
lexical-channel run (four columns, two networks) is its own test, counting encoder passes.
"""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import yaml
from conftest import make_tiny_bert
from test_evaluation import TINY_BEIR, _load_script

from embed.cli import run_main
from embed.evaluation.mteb_eval import LocalBEIRTask, evaluate_beir, evaluate_model
from embed.modeling.model import EmbeddingModel


def _run(argv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["eval_mteb.py", *map(str, argv)])
        run_main(_load_script().main)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A trained run whose recipe differs from the base model's own settings (query prompt and a
    3-token query limit) and lists Matryoshka dims up to the full width (32), as the nemotron recipes do."""
    root = tmp_path_factory.mktemp("trained_run")
    base = make_tiny_bert(root / "base" / "model", seed=0)  # saved: no prompt, query limit 32
    run_dir = root / "run"
    make_tiny_bert(run_dir / "model", seed=2)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(base), "matryoshka_dims": [16, 32], "query_max_length": 3,
                  "query_prompt": "query: "},
        "data": {"eval": [str(TINY_BEIR)], "eval_split": "test"}}))
    _run([recipe])
    return {"base": base, "run_dir": run_dir, "summary": json.loads((run_dir / "eval_summary.json").read_text())}


# ---------------------------------------------------------------- issue 16.1: Matryoshka dims
def test_matryoshka_dims_may_include_the_full_width(trained_run):
    """Training accepts a dim equal to the embedding size; so does evaluation: it is the full embedding."""
    summary, run_dir = trained_run["summary"], trained_run["run_dir"]
    trained = EmbeddingModel.from_pretrained(str(run_dir / "model"))
    full = evaluate_beir(trained, str(TINY_BEIR))["ndcg_at_10"]
    at_16 = evaluate_model(trained, [LocalBEIRTask(str(TINY_BEIR))], name="t", revision="r", dim=16)["tiny_beir"]
    by_dim = summary["matryoshka_main_score"]
    assert by_dim["32"]["tiny_beir"]["trained"] == pytest.approx(full)
    assert by_dim["16"]["tiny_beir"]["trained"] == pytest.approx(at_16["main_score"])
    assert summary["embedding_dim"] == {"trained": 32}
    table = (run_dir / "eval" / "results.md").read_text()
    assert "| tiny_beir (16d) | test |" in table and "| tiny_beir (32d, full) | test |" in table


def test_matryoshka_dim_above_the_width_is_a_one_line_error(tmp_path, capsys, tiny_bert_dir):
    """Also shows that `--model/--data` with a recipe reads the recipe's dims."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"matryoshka_dims": [16, 64]}}))
    with pytest.raises(SystemExit) as e:
        _run([recipe, "--model", tiny_bert_dir, "--data", TINY_BEIR])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading messages
    assert last.startswith("error: ") and "key 'model.matryoshka_dims': [64] above the embedding size 32" in last


# ---------------------------------------------------------------- issue 17: the base model as published
def test_base_column_is_the_base_model_with_its_own_settings(trained_run):
    summary, base = trained_run["summary"], trained_run["base"]
    published = evaluate_beir(EmbeddingModel.from_pretrained(str(base)), str(TINY_BEIR))["ndcg_at_10"]
    under_recipe = evaluate_beir(EmbeddingModel.from_pretrained(str(base), query_max_length=3, query_prompt="query: "),
                                 str(TINY_BEIR))["ndcg_at_10"]
    assert published != pytest.approx(under_recipe)  # the recipe's settings would change the base column
    assert summary["ndcg_at_10"]["tiny_beir"]["base"] == pytest.approx(published)
    identity = summary["models"]["base"]
    assert identity["settings_from"] == "published"
    assert identity["query_max_length"] == 32 and identity["query_prompt"] == ""


def test_a_sentence_transformers_folder_keeps_its_one_token_limit_for_queries(tmp_path):
    """A folder published by sentence-transformers (no embed_config.json) truncates queries at its
    max_seq_length; our loader's own default (128) must not stand in for it."""
    from embed.evaluation.encoders import load_as_published
    from embed.recipe import ModelConfig

    folder = make_tiny_bert(tmp_path / "st", seed=0)  # max_seq_length 64
    (folder / "embed_config.json").unlink()
    model, source = load_as_published(str(folder), ModelConfig(query_max_length=4))
    assert source == "published" and model.settings.query_max_length == 64 == model.settings.max_length


# ---------------------------------------------------------------- issue 18.7 / 18.9: outputs
def test_summary_written_once_with_per_query_scores(trained_run):
    run_dir, summary = trained_run["run_dir"], trained_run["summary"]
    assert not (run_dir / "eval" / "eval_summary.json").exists()
    per_query = summary["per_query_ndcg_at_10"]["tiny_beir"]
    assert set(per_query) == {"base", "trained"} and set(per_query["trained"]) == {"q1", "q2", "q3"}
    for role in ("base", "trained"):  # the per-query scores average to mteb's own figure
        assert np.mean(list(per_query[role].values())) == pytest.approx(summary["ndcg_at_10"]["tiny_beir"][role],
                                                                        abs=1e-4)
    assert (run_dir / "eval" / "per_query.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _captured_figure(monkeypatch, draw):
    from embed.evaluation import leaderboard

    figures = []
    monkeypatch.setattr(leaderboard, "save_figure", lambda fig, path, **kw: figures.append(fig))
    draw()
    return figures[0]


def test_scores_chart_shows_the_delta_and_a_compact_legend(monkeypatch, tmp_path):
    from embed.evaluation.leaderboard import bar_chart

    scores = {"base": {"scifact": 0.6451}, "trained": {"scifact": 0.7012}}
    fig = _captured_figure(monkeypatch, lambda: bar_chart(
        scores, {"base": "sentence-transformers/all-MiniLM-L6-v2", "trained": "local/run"}, tmp_path / "s.png"))
    ax = fig.axes[0]
    assert any(t.get_text() == "Δ +5.61" for t in ax.texts)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.width <= axes.width  # not beside the axes, taking half the figure
    assert all(len(t.get_text()) < 25 for t in ax.get_legend().get_texts())


def test_per_query_chart_sorts_each_querys_change(monkeypatch, tmp_path):
    from embed.evaluation.leaderboard import per_query_chart

    per_query = {"d": {"base": {"a": 0.5, "b": 0.2, "c": 1.0}, "trained": {"a": 0.75, "b": 0.2, "c": 0.5}}}
    fig = _captured_figure(monkeypatch, lambda: per_query_chart(per_query, tmp_path / "p.png"))
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == pytest.approx([-50.0, 0.0, 25.0])
    assert "1 queries better, 1 worse, 1 unchanged" in fig.axes[0].get_title()
    assert per_query_chart({"d": {"base": {"a": 1.0}}}, tmp_path / "none.png") is False


# ---------------------------------------------------------------- issue 18.2: the model card's snippet runs
def test_model_card_snippet_runs_as_printed(trained_run):
    """The card's code block, executed unchanged: it loads the folder (not a hub id), needs no
    trust_remote_code for a plain model, and encodes with the prompt and the query limit trained with."""
    model_dir = trained_run["run_dir"] / "model"
    card = (model_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'SentenceTransformer("{model_dir}")' in code and "trust_remote_code" not in code
    assert "model.max_seq_length = 32" in code  # the trained model's query limit (saved with it)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    ours = EmbeddingModel.from_pretrained(str(model_dir))
    np.testing.assert_allclose(namespace["queries"], ours.encode(["..."], kind="query"), atol=1e-5)
    np.testing.assert_allclose(namespace["documents"], ours.encode(["..."], kind="document"), atol=1e-5)
    assert namespace["scores"].shape == (1, 1)


# ---------------------------------------------------------------- issues 17 / 18.10: a model with a lexical channel
def test_lexical_channel_run_scores_four_columns_with_two_encoder_passes(tmp_path, monkeypatch):
    """base | untrained_hybrid | trained | trained_dense: the untrained hybrid is the base model with
    the same channel (IDF over data.corpus), and the corpus goes once through each of the two networks."""
    from embed.data import load_corpus
    from embed.modeling.lexical import fit_lexical_channel

    base = make_tiny_bert(tmp_path / "base" / "model", seed=0)
    run_dir = tmp_path / "run"
    dense_dir = make_tiny_bert(tmp_path / "dense", seed=2)
    trained = EmbeddingModel.from_pretrained(str(dense_dir))
    corpus = load_corpus(str(TINY_BEIR))
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    trained.lexical = fit_lexical_channel(trained, texts, dim=64, weight=0.5, seed=7)
    trained.save_pretrained(run_dir / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": {"name_or_path": str(base)},
                                      "data": {"corpus": str(TINY_BEIR), "eval": [str(TINY_BEIR)]}}))

    corpus_passes = []
    encode = EmbeddingModel.encode

    def counting_encode(self, texts, kind="document", **kwargs):
        texts = list(texts)
        if kind == "document" and len(texts) == len(corpus):
            corpus_passes.append(id(self.backbone))
        return encode(self, texts, kind=kind, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "encode", counting_encode)
    _run([recipe])
    monkeypatch.setattr(EmbeddingModel, "encode", encode)
    assert len(corpus_passes) == 2 and len(set(corpus_passes)) == 2  # one pass per network, four columns

    table = (run_dir / "eval" / "results.md").read_text()
    assert "| dataset | split | base | untrained_hybrid | trained | trained_dense | Δ | Δ vs untrained_hybrid |" in table
    ndcg = json.loads((run_dir / "eval_summary.json").read_text())["ndcg_at_10"]["tiny_beir"]
    untrained = EmbeddingModel.from_pretrained(str(base))
    untrained.lexical = fit_lexical_channel(untrained, texts, dim=64, weight=0.5, seed=7)
    expected = {
        "base": EmbeddingModel.from_pretrained(str(base)),
        "untrained_hybrid": untrained,
        "trained": EmbeddingModel.from_pretrained(str(run_dir / "model")),  # the model with its channel, as saved
        "trained_dense": EmbeddingModel.from_pretrained(str(dense_dir)),
    }
    for role, model in expected.items():
        assert ndcg[role] == pytest.approx(evaluate_beir(model, str(TINY_BEIR))["ndcg_at_10"], abs=1e-6), role


def test_hybrid_encoder_equals_the_model_carrying_the_channel(tmp_path):
    """The shared-pass hybrid (dense output + channel over the tokens) is the saved model's own output."""
    from embed.data import load_corpus
    from embed.evaluation.encoders import CachedEncoder, HybridEncoder, dense_view
    from embed.modeling.lexical import fit_lexical_channel

    model = EmbeddingModel.from_pretrained(str(make_tiny_bert(tmp_path / "m", seed=1, query_prompt="find: ")))
    corpus = load_corpus(str(TINY_BEIR))
    model.lexical = fit_lexical_channel(model, [corpus.doc_text(i) for i in range(len(corpus))], dim=32, weight=0.6)
    hybrid = HybridEncoder(CachedEncoder(dense_view(model)), model.lexical)
    texts = ["alpha beta gamma", "epsilon", "a much longer text about zeta and delta and alpha"]
    for kind in ("query", "document"):
        np.testing.assert_allclose(hybrid.encode(texts, kind=kind, batch_size=2), model.encode(texts, kind=kind),
                                   atol=1e-6)
    assert model.lexical is not None  # the views changed nothing on the model
