"""embed.retrieval.channel_weight: the lexical channel's weight chosen from generated queries alone."""
import numpy as np
import pytest

from embed.retrieval.channel_weight import choose_channel_weight, mrr_at_10


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mrr_by_hand():
    scores = np.array([[0.9, 0.1, 0.5],    # source 0 ranks 1
                       [0.9, 0.1, 0.5],    # source 2 ranks 2
                       [0.5, 0.5, 0.1]])   # source 1 ties with doc 0: counted as rank 2
    assert mrr_at_10(scores, np.array([0, 2, 1])) == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    many = np.tile(np.arange(20.0)[::-1], (1, 1))  # doc i scores 19 - i: doc 10 ranks 11
    assert mrr_at_10(many, np.array([10])) == 0.0


def domain(rng, n_docs=200, n_queries=80, dense_noise=1.0, lexical_noise=1.0):
    """Documents are random directions; a query is its source document plus noise, in each half."""
    src = rng.integers(0, n_docs, n_queries)
    dense_d, lexical_d = unit(rng.normal(size=(n_docs, 32))), unit(rng.normal(size=(n_docs, 64)))
    dense_q = unit(dense_d[src] + dense_noise * rng.normal(size=(n_queries, 32)) / np.sqrt(32))
    lexical_q = unit(lexical_d[src] + lexical_noise * rng.normal(size=(n_queries, 64)) / np.sqrt(64))
    return dense_q, dense_d, lexical_q, lexical_d, src


def scores(dense_q, dense_d, lexical_q, lexical_d, src):
    return dense_q @ dense_d.T, lexical_q @ lexical_d.T, src


def test_a_useful_lexical_half_gets_weight_and_a_useless_one_is_switched_off():
    rng = np.random.default_rng(0)
    # both halves noisy, errors independent: mixing them beats either
    choice = choose_channel_weight(*scores(*domain(rng, dense_noise=2.5, lexical_noise=2.5)))
    assert 0.2 <= choice.weight <= 0.8, choice
    assert choice.mrr_at_10[str(choice.weight)] > choice.mrr_at_10["0.0"] + 1.0
    # the lexical half is noise (docstring words vs code): the channel stays off
    dense_q, dense_d, _, lexical_d, src = domain(rng, dense_noise=2.5)
    useless_q = unit(rng.normal(size=(len(src), 64)))
    off = choose_channel_weight(*scores(dense_q, dense_d, useless_q, lexical_d, src))
    assert off.weight == 0.0 and off.reason.startswith("channel off")
    assert off.queries == len(src)


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(1)
    d = domain(rng)
    with pytest.raises(ValueError, match="no generated queries"):
        choose_channel_weight(*scores(*[x[:0] if i in (0, 2, 4) else x for i, x in enumerate(d)]))
    with pytest.raises(ValueError, match="must contain 0.0"):
        choose_channel_weight(*scores(*d), grid=(0.5, 0.6))


def test_lexical_scores_match_the_channel_of_a_model_and_ignore_the_query_prompt(tiny_bert_dir):
    from embed.modeling.lexical import fit_lexical_channel
    from embed.modeling.model import EmbeddingModel
    from embed.retrieval.channel_weight import lexical_scores

    docs = ["the zebrafish heart regenerates", "tax law of the river delta", "cell division in yeast"]
    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir), query_prompt="tax law: ")
    channel = fit_lexical_channel(model, docs, dim=256, weight=0.5)
    got = lexical_scores(model, channel, ["zebrafish heart", "yeast division"], docs, batch_size=2)
    assert got.shape == (2, 3) and list(got.argmax(axis=1)) == [0, 2]  # the prompt's words never match doc 1
    model.lexical = channel  # the same numbers as the model's own lexical half (its second block / sqrt(w))
    full = model.encode(["zebrafish heart"], kind="query")
    doc_full = model.encode(docs, kind="document")
    expected = (full[:, 32:] @ doc_full[:, 32:].T) / 0.5
    assert np.allclose(got[:1], expected, atol=1e-5)


def test_mining_chooses_the_weight_from_kept_and_round_trip_rejected_queries(tmp_path, tiny_bert_dir, monkeypatch):
    """Queries that name their document's rare words: a random-init dense model cannot find the
    documents, the lexical channel can, so the rule turns the channel on; rows rejected for another
    reason than the round trip are not used."""
    import importlib.util
    import json
    import sys

    import yaml

    from tests.conftest import REPO

    words = ["zebrafish", "glacier", "saxophone", "volcano", "cathedral", "pineapple", "telescope", "hurricane",
             "origami", "kangaroo", "lighthouse", "avalanche"]
    beir = tmp_path / "beir"
    beir.mkdir()
    pairs = [f"{a} {b}" for a in words for b in words[:4] if a != b]  # 44 documents, each its own two rare words
    docs = [{"_id": f"d{i}", "title": "", "text": f"notes on the {w} and other things"} for i, w in enumerate(pairs)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"doc_id": f"d{i}", "sample": 0, "query": f"what about {w}", "kept": i % 3 != 0,
             "reject_reason": None if i % 3 else ("round_trip" if i % 2 else "copy")} for i, w in enumerate(pairs)]
    (run / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(run), "seed": 1, "data": {"corpus": str(beir)},
        "model": {"name_or_path": str(tiny_bert_dir), "max_length": 32, "query_max_length": 16,
                  "lexical_weight_rule": "generated", "lexical_dim": 512},
        "mine": {"num_negatives": 2, "depth": 8, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}}))
    spec = importlib.util.spec_from_file_location("mine_faiss", REPO / "scripts" / "mine_faiss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["mine_faiss.py", str(recipe)])
    module.run_main(module.main)
    choice = json.loads((run / "mine_summary.json").read_text())["lexical_channel"]
    kept, round_trip = sum(r["kept"] for r in rows), sum(r["reject_reason"] == "round_trip" for r in rows)
    assert choice["queries"] == kept + round_trip == 44 - 8  # the 8 rejected as copies are left out
    assert choice["weight"] > 0, choice["reason"]
    assert choice["mrr_at_10"][str(choice["weight"])] > choice["mrr_at_10"]["0.0"]


def test_training_takes_the_weight_mining_chose_or_refuses_without_it(tmp_path):
    import json

    from embed.config import parse_recipe
    from embed.errors import ConfigError
    from embed.training.stages import channel_weight, run_settings

    base = ["--run_dir", str(tmp_path), "--data.corpus", str(tmp_path), "--model.lexical_weight", "0.6"]
    assert channel_weight(parse_recipe("train", base)) == (0.6, "model.lexical_weight")
    generated = parse_recipe("train", [*base, "--model.lexical_weight_rule", "generated"])
    with pytest.raises(ConfigError, match="mine_summary.json: no lexical channel choice"):
        channel_weight(generated)
    (tmp_path / "mine_summary.json").write_text(json.dumps({"lexical_channel": {"weight": 0.3, "reason": "x"}}))
    with pytest.raises(ConfigError, match="chosen for model.lexical_scheme tfidf, this run trains bm25"):
        channel_weight(generated)  # a summary without a scheme predates them: TF-IDF
    (tmp_path / "mine_summary.json").write_text(json.dumps({"lexical_channel": {"weight": 0.0, "reason": "channel off: x",
                                                                                "scheme": "bm25"}}))
    with pytest.raises(ConfigError, match="chosen for model.lexical_max_length 0, this run trains 4096"):
        channel_weight(generated)  # a summary without the key predates it: the dense half's cut
    (tmp_path / "mine_summary.json").write_text(json.dumps({"lexical_channel": {"weight": 0.0, "reason": "channel off: x",
                                                                                "scheme": "bm25", "max_length": 4096}}))
    assert channel_weight(generated) == (0.0, f"chosen by mining ({tmp_path / 'mine_summary.json'}): channel off: x")
    assert run_settings(generated)["model.lexical_weight"] == 0.0  # a re-mined choice changes the fingerprint
