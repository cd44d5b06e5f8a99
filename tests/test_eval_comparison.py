"""scripts/eval_mteb.py on a trained run, as a user runs it: the columns it compares and what it writes.

One module-scoped run of the script (tiny random BERTs, the toy BEIR folder) is read by several
tests: Matryoshka dims up to the full width, the base model under its own settings, the summary
written once, the per-query chart, and the model card's usage snippet executed as printed. The
lexical-channel run (five columns, two networks) is another module-scoped run: its columns, counting
encoder passes, and its model card's two snippets (one vector; dense + sparse) executed as printed.
"""
from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_bert
from test_evaluation import TINY_BEIR, _load_script

from embed.cli import run_main
from embed.evaluation.mteb_eval import LocalBEIRTask, evaluate_beir, evaluate_model
from embed.modeling.model import EmbeddingModel, EncoderSettings


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
LEXICAL_WEIGHT = 0.5


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    """A trained run whose model carries a lexical channel (IDF over the toy corpus), evaluated once;
    records which networks encoded the whole corpus."""
    from embed.data import load_corpus
    from embed.modeling.lexical import fit_lexical_channel

    root = tmp_path_factory.mktemp("channel_run")
    base = make_tiny_bert(root / "base" / "model", seed=0)
    run_dir = root / "run"
    dense_dir = make_tiny_bert(root / "dense", seed=2)
    trained = EmbeddingModel.from_pretrained(str(dense_dir))
    corpus = load_corpus(str(TINY_BEIR))
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    trained.lexical = fit_lexical_channel(trained, texts, dim=64, weight=LEXICAL_WEIGHT, seed=7)
    trained.save_pretrained(run_dir / "model")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": {"name_or_path": str(base)},
                                      "data": {"corpus": str(TINY_BEIR), "eval": [str(TINY_BEIR)]}}))

    corpus_passes = []
    encode = EmbeddingModel.encode

    def counting_encode(self, texts, kind="document", **kwargs):
        texts = list(texts)
        if kind == "document" and len(texts) == len(corpus):
            corpus_passes.append(id(self.backbone))
        return encode(self, texts, kind=kind, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EmbeddingModel, "encode", counting_encode)
        _run([recipe])
    return {"base": base, "run_dir": run_dir, "dense_dir": dense_dir, "texts": texts, "corpus_passes": corpus_passes}


class _BinaryIdfByHand(torch.nn.Module):
    """The sparse column's expectation, independent of the export: each distinct token of a text (cut
    as the model cuts documents) weighs its IDF once, L2-normalised; no prompt."""

    def __init__(self, model: EmbeddingModel):
        super().__init__()
        self.tokenizer, self.idf, self.max_length = model.tokenizer, model.lexical.idf.double().numpy(), model.settings.max_length
        self.settings = EncoderSettings(max_length=self.max_length)
        self.normalize, self.query_prompt, self.document_prompt = True, "", ""

    def encode(self, texts, kind="document", batch_size=64, show_progress=False):
        out = np.zeros((len(texts), len(self.idf)), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = sorted(set(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]))
            vector = np.zeros(len(self.idf))
            vector[ids] = self.idf[ids]
            out[row] = vector / max(np.linalg.norm(vector), 1e-12)
        return out


def test_lexical_channel_run_scores_five_columns_with_two_encoder_passes(channel_run):
    """base | untrained_hybrid | trained | trained_dense | sparse: the untrained hybrid is the base model
    with the same channel (IDF over data.corpus), the sparse column the exported lexical half (no network),
    and the corpus goes once through each of the two networks."""
    from embed.modeling.lexical import fit_lexical_channel

    run_dir, base, texts = channel_run["run_dir"], channel_run["base"], channel_run["texts"]
    corpus_passes = channel_run["corpus_passes"]
    assert len(corpus_passes) == 2 and len(set(corpus_passes)) == 2  # one pass per network

    table = (run_dir / "eval" / "results.md").read_text()
    assert ("| dataset | split | base | untrained_hybrid | trained | trained_dense | sparse | Δ | Δ vs untrained_hybrid |"
            in table)
    assert "sparse = `local/run-sparse-half` (the lexical half exported with the model" in table
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    ndcg = summary["ndcg_at_10"]["tiny_beir"]
    untrained = EmbeddingModel.from_pretrained(str(base))
    untrained.lexical = fit_lexical_channel(untrained, texts, dim=64, weight=LEXICAL_WEIGHT, seed=7)
    trained = EmbeddingModel.from_pretrained(str(run_dir / "model"))  # the model with its channel, as saved
    expected = {
        "base": EmbeddingModel.from_pretrained(str(base)),
        "untrained_hybrid": untrained,
        "trained": trained,
        "trained_dense": EmbeddingModel.from_pretrained(str(channel_run["dense_dir"])),
        "sparse": _BinaryIdfByHand(trained),
    }
    for role, model in expected.items():
        assert ndcg[role] == pytest.approx(evaluate_beir(model, str(TINY_BEIR))["ndcg_at_10"], abs=1e-6), role
    assert summary["models"]["sparse"]["settings_from"] == "exported with the model"
    assert summary["models"]["sparse"]["query_prompt"] == ""


def test_channel_model_card_shows_the_hybrid_and_dense_plus_sparse_snippets_that_run(channel_run):
    """Two code blocks, each executed as printed: the one-vector model (trust_remote_code, this package's
    channel module) and the two plain halves, whose fused score is (1 - w) dense cosine + w sparse dot."""
    model_dir = channel_run["run_dir"] / "model"
    card = (model_dir / "README.md").read_text()
    hybrid_code, halves_code = re.findall(r"```python\n(.*?)```", card, re.S)
    assert f'SentenceTransformer("{model_dir}", trust_remote_code=True)' in hybrid_code
    assert f'SentenceTransformer("{model_dir}/dense")' in halves_code
    assert f'SparseEncoder("{model_dir}/sparse")' in halves_code
    assert "trust_remote_code" not in halves_code and f"w = {LEXICAL_WEIGHT}" in halves_code

    namespace: dict = {}
    exec(compile(hybrid_code, "hybrid snippet", "exec"), namespace)
    ours = EmbeddingModel.from_pretrained(str(model_dir))
    np.testing.assert_allclose(namespace["queries"], ours.encode(["..."], kind="query"), atol=1e-5)

    halves: dict = {}
    exec(compile(halves_code, "dense + sparse snippet", "exec"), halves)
    dense_of = {kind: ours.encode(["..."], kind=kind)[:, :32] / np.sqrt(1 - LEXICAL_WEIGHT) for kind in ("query", "document")}
    np.testing.assert_allclose(halves["query_dense"], dense_of["query"], atol=1e-5)
    np.testing.assert_allclose(halves["document_dense"], dense_of["document"], atol=1e-5)
    by_hand = _BinaryIdfByHand(ours)
    sparse_dot = by_hand.encode(["..."], kind="query") @ by_hand.encode(["..."]).T
    assert sparse_dot[0, 0] > 0  # the text shares a token with itself: the sparse half counts
    expected = (1 - LEXICAL_WEIGHT) * dense_of["query"] @ dense_of["document"].T + LEXICAL_WEIGHT * sparse_dot
    np.testing.assert_allclose(halves["scores"].numpy(), expected, atol=1e-5)


def test_dense_plus_sparse_card_for_a_hub_id_and_a_latent_attention_head():
    """A hub id: the halves load from a local copy of the repository (sentence-transformers takes no
    subfolder); a latent-attention dense half asks for the opt-in, the sparse half never does."""
    from embed.evaluation.leaderboard import model_card
    from embed.modeling.model import LATENT_ATTENTION_ST, LEXICAL_CHANNEL_ST

    card = model_card("user/m", "base/m", {}, [], "", load_path="user/m", settings=EncoderSettings(),
                      package_modules=(LATENT_ATTENTION_ST, LEXICAL_CHANNEL_ST),
                      lexical=SimpleNamespace(scheme="tfidf", weight=0.25), dense_package_modules=(LATENT_ATTENTION_ST,))
    halves_code = re.findall(r"```python\n(.*?)```", card, re.S)[1]
    assert 'folder = snapshot_download("user/m")' in halves_code
    assert 'SentenceTransformer(f"{folder}/dense", trust_remote_code=True)' in halves_code
    assert 'SparseEncoder(f"{folder}/sparse")' in halves_code and "w = 0.25" in halves_code
    plain = model_card("user/m", "base/m", {}, [], "", load_path="user/m", settings=EncoderSettings())
    assert len(re.findall(r"```python", plain)) == 1 and "SparseEncoder" not in plain


def test_bm25_model_card_shows_dense_plus_bm25_that_scores_as_the_one_vector(tmp_path, tiny_bert_dir):
    """A BM25 channel's card: the one-vector snippet encodes with encode_query / encode_document, and the
    second snippet (dense/ + bm25s), run on real texts, gives the one vector's dot product."""
    from embed.evaluation.leaderboard import model_card
    from embed.modeling.lexical import fit_lexical_channel
    from embed.modeling.model import LEXICAL_CHANNEL_ST

    documents = ["Zebrafish hearts regenerate after injury.", "Tax law of the river delta.",
                 "Fin regeneration in adult zebrafish.", "Cell division in budding yeast."]
    queries = ["zebrafish heart regeneration", "river law", "unknownword"]
    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir))
    model.lexical = fit_lexical_channel(model, documents, dim=1 << 20, weight=0.4, scheme="bm25")
    model.save_pretrained(tmp_path / "m")
    card = model_card("local/m", "base/m", {}, [], "", load_path=str(tmp_path / "m"), settings=model.settings,
                      package_modules=(LEXICAL_CHANNEL_ST,), lexical=model.lexical)
    one_vector, halves = re.findall(r"```python\n(.*?)```", card, re.S)
    assert "encode_query" in one_vector and "SparseEncoder" not in halves and "w = 0.4" in halves
    namespace: dict = {}
    code = halves.replace('documents = ["..."]', f"documents = {documents!r}").replace('queries = ["..."]',
                                                                                      f"queries = {queries!r}")
    exec(compile(code, "dense + BM25 snippet", "exec"), namespace)
    expected = model.encode(queries, kind="query") @ model.encode(documents, kind="document").T
    np.testing.assert_allclose(namespace["scores"], expected, atol=1e-5)


def test_hybrid_encoder_equals_the_model_carrying_the_channel(tmp_path):
    """The shared-pass hybrid (dense output + channel over the tokens) is the saved model's own output."""
    from embed.data import load_corpus
    from embed.evaluation.encoders import CachedEncoder, HybridEncoder
    from embed.modeling.lexical import fit_lexical_channel
    from embed.modeling.model import dense_view

    model = EmbeddingModel.from_pretrained(str(make_tiny_bert(tmp_path / "m", seed=1, query_prompt="find: ")))
    corpus = load_corpus(str(TINY_BEIR))
    model.lexical = fit_lexical_channel(model, [corpus.doc_text(i) for i in range(len(corpus))], dim=32, weight=0.6)
    hybrid = HybridEncoder(CachedEncoder(dense_view(model)), model.lexical)
    texts = ["alpha beta gamma", "epsilon", "a much longer text about zeta and delta and alpha"]
    for kind in ("query", "document"):
        np.testing.assert_allclose(hybrid.encode(texts, kind=kind, batch_size=2), model.encode(texts, kind=kind),
                                   atol=1e-6)
    assert model.lexical is not None  # the views changed nothing on the model
