"""embed.modeling.lexical: the hashed lexical channel (TF-IDF or BM25) appended to the dense embedding."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from embed.config import parse_recipe
from embed.errors import ConfigError
from embed.modeling.lexical import LexicalChannel, fit_lexical_channel
from embed.modeling.model import EmbeddingModel
from tests.conftest import REPO, toy_train_rows, write_jsonl

DOCS = ["the zebrafish heart regenerates after injury", "tax law of the river delta", "zebrafish fins and tax law",
        "a study of cell division in yeast", "the heart of the matter"]


def test_fit_gives_rare_tokens_high_idf_and_special_tokens_none():
    channel = LexicalChannel.fit([[1, 5, 7], [1, 5], [1, 9]], vocab_size=10, ignore_ids=[0, 1], dim=16, weight=0.5)
    idf = channel.idf
    assert idf[0] == idf[1] == 0                       # special tokens never match
    assert idf[9] == idf[7] > idf[5] > 0               # in one document > in two
    assert idf[3] == idf.max()                         # never seen: rarest of all


def test_concatenation_scores_as_the_weighted_mix_of_both_cosines():
    torch.manual_seed(0)
    channel = LexicalChannel(torch.rand(50) + 0.1, dim=64, weight=0.3)
    ids = torch.randint(0, 50, (6, 12))
    mask = torch.ones_like(ids)
    mask[3, 8:] = 0
    dense = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    both = channel(dense, ids, mask)
    lexical = channel.lexical(ids, mask)
    assert both.shape == (6, 8 + 64)
    assert torch.allclose(both.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(both @ both.T, 0.7 * dense @ dense.T + 0.3 * lexical @ lexical.T, atol=1e-5)
    # a masked token does not count; order does not matter, repetition does (sublinearly)
    assert torch.allclose(channel.lexical(ids[3:4, :8], mask[3:4, :8]), lexical[3:4], atol=1e-6)
    assert torch.allclose(channel.lexical(ids[:1].flip(1), mask[:1]), lexical[:1], atol=1e-6)


@pytest.mark.parametrize("weight, dim", [(0.0, 8), (1.0, 8), (0.5, 0)])
def test_out_of_range_settings_are_refused(weight, dim):
    with pytest.raises(ValueError):
        LexicalChannel(torch.ones(4), dim=dim, weight=weight)


def test_channel_finds_the_document_sharing_a_rare_word_and_survives_save_and_load(tmp_path, tiny_bert_dir):
    """A random-init dense model ranks at chance; the channel puts the document holding the query's
    rare word first. Saved, the model loads with the channel in EmbeddingModel and in sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir), query_prompt="zebrafish heart: ")
    model.lexical = fit_lexical_channel(model, DOCS, dim=256, weight=0.5)
    docs = model.encode(DOCS, kind="document")
    queries = model.encode(["regenerates", "yeast division"], kind="query")
    assert docs.shape[1] == 32 + 256
    # the query prompt names document 0's words: kept out of lexical matching, it cannot pull queries there
    assert list((queries @ docs.T).argmax(axis=1)) == [0, 3]
    as_document = model.encode(["yeast division"], kind="document")  # no document prompt
    assert np.allclose(queries[1, 32:], as_document[0, 32:], atol=1e-6)

    model.save_pretrained(tmp_path / "m")
    again = EmbeddingModel.from_pretrained(str(tmp_path / "m"))
    assert np.allclose(again.encode(DOCS, kind="document"), docs, atol=1e-5)
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu", trust_remote_code=True)
    assert st.get_embedding_dimension() == 32 + 256
    assert np.allclose(st.encode(DOCS), docs, atol=1e-5)
    assert np.allclose(st.encode(["yeast division"], prompt_name="query"), queries[1:], atol=1e-5)


def test_saved_channel_keeps_its_tables_and_a_channel_saved_without_them_still_loads(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from embed.modeling.lexical import WEIGHTS_NAME

    channel = LexicalChannel(torch.rand(40) + 0.1, dim=16, weight=0.4, seed=3)
    ids, mask = torch.randint(0, 40, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    expected = channel.lexical(ids, mask)
    channel.save(tmp_path / "new")
    assert set(load_file(tmp_path / "new" / WEIGHTS_NAME)) == {"idf", "bucket", "sign"}
    # if torch's random stream changed, a saved channel must not: load with a different stream
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda low, high, size, generator=None: real_randint(low, high, size))
    assert torch.allclose(LexicalChannel.load(tmp_path / "new").lexical(ids, mask), expected)
    monkeypatch.undo()
    # the layout written before the tables were stored: IDF only, tables drawn from the seed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lexical_channel.json").write_text((tmp_path / "new" / "lexical_channel.json").read_text())
    save_file({"idf": channel.idf.contiguous()}, tmp_path / "old" / WEIGHTS_NAME)
    assert torch.allclose(LexicalChannel.load(tmp_path / "old").lexical(ids, mask), expected)


def test_model_saved_before_the_package_was_regrouped_still_loads(tmp_path, tiny_bert_dir):
    """modules.json of older saves names `embed.lexical.LexicalChannelST`; our loader maps it."""
    import json

    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir))
    model.lexical = fit_lexical_channel(model, DOCS, dim=64, weight=0.5)
    model.save_pretrained(tmp_path / "m")
    modules_file = tmp_path / "m" / "modules.json"
    modules = json.loads(modules_file.read_text())
    for m in modules:
        m["type"] = m["type"].replace("embed.modeling.lexical.", "embed.lexical.")
    modules_file.write_text(json.dumps(modules))
    again = EmbeddingModel.from_pretrained(str(tmp_path / "m"))
    assert again.lexical is not None
    assert np.allclose(again.encode(DOCS, kind="document"), model.encode(DOCS, kind="document"), atol=1e-5)


def test_recipe_checks_the_lexical_keys(tmp_path):
    base = ["--run_dir", str(tmp_path / "r"), "--data.corpus", "x"]
    with pytest.raises(ConfigError, match="model.lexical_weight"):
        parse_recipe("train", [*base, "--model.lexical_weight", "1.5"])
    with pytest.raises(ConfigError, match="needs model.normalize"):
        parse_recipe("train", [*base, "--model.lexical_weight", "0.5", "--model.normalize", "false"])
    with pytest.raises(ConfigError, match="needs data.corpus"):
        parse_recipe("train", ["--run_dir", str(tmp_path / "r"), "--model.lexical_weight", "0.5"])
    with pytest.raises(ConfigError, match="model.lexical_max_length' must be >= 0"):
        parse_recipe("train", [*base, "--model.lexical_weight", "0.5", "--model.lexical_max_length", "-1"])


def test_training_with_lexical_weight_saves_the_channel_fitted_on_the_corpus(tmp_path, tiny_bert_dir):
    """Appended after training by default; with train.lexical_aware fitted first, so the dense half
    trains against the mixed score and ends with other weights."""
    from safetensors.numpy import load_file

    corpus = write_jsonl(tmp_path / "beir" / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(DOCS)])
    data = write_jsonl(tmp_path / "train.jsonl", toy_train_rows(16, negatives=1))
    outputs = {}
    for aware in ("false", "true"):
        out = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "train.py"), "--run_dir", str(tmp_path / aware),
             "--model.name_or_path", str(tiny_bert_dir), "--train.stages.0.data", str(data), "--train.max_steps", "2",
             "--train.per_device_batch_size", "8", "--train.report_to", "[]", "--data.corpus", str(corpus.parent),
             "--train.stages.0.learning_rate", "1.0e-03", "--model.lexical_weight", "0.5", "--model.lexical_dim", "128",
             "--train.lexical_aware", aware],
            env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "PATH": ""},
            capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outputs[aware] = out.stdout
        model = EmbeddingModel.from_pretrained(str(tmp_path / aware / "model"))
        assert model.lexical is not None and model.lexical.dim == 128 and model.lexical.weight == 0.5
        assert model.encode(["zebrafish"]).shape == (1, 32 + 128)
    for aware, stdout in outputs.items():
        fitted, batch = stdout.index("lexical channel: bm25 fitted on 5 documents"), stdout.index("total train batch size")
        assert (fitted < batch) == (aware == "true")
    a, b = (load_file(str(tmp_path / aware / "model" / "model.safetensors")) for aware in ("false", "true"))
    assert not np.allclose(a["embeddings.word_embeddings.weight"], b["embeddings.word_embeddings.weight"])


# ---------------------------------------------------------------- the BM25 scheme
ABSTRACTS = ["Zebrafish hearts regenerate after cardiac injury; regeneration needs fibroblasts.",
             "Tax law of the river delta, and the law of rivers in general.",
             "Zebrafish fins regrow: fin regeneration in adult zebrafish.",
             "A study of cell division in budding yeast, cells dividing twice.",
             "The heart of the matter is that matter matters."]
QUERIES = ["does the zebrafish heart regenerate", "river tax law", "yeast cell division cycle", "unknownword"]


def _bm25_by_hand(documents, queries, k1, b):
    """BM25 from bm25s (Lucene's), over the best score the query could reach (its terms' IDF summed)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    tokens = bm25s.tokenize(documents, stopwords="en", stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(tokens, show_progress=False)
    df = np.zeros(len(tokens.vocab))
    for ids in tokens.ids:
        df[np.unique(ids)] += 1
    idf = np.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
    out = np.zeros((len(queries), len(documents)))
    for row, words in enumerate(bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False,
                                               show_progress=False)):
        terms = sorted({w for w in words if w in tokens.vocab})
        if terms:
            out[row] = retriever.get_scores(terms) / idf[[tokens.vocab[t] for t in terms]].sum()
    return out


def test_bm25_channel_scores_are_bm25_over_the_query_bound(tiny_bert_dir):
    """query . document of the lexical halves = bm25s' BM25 / the query's bound, on the text the model
    reads (decoded token ids: lower-cased by this tokenizer), with buckets wide enough for no collision."""
    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir))
    channel = fit_lexical_channel(model, ABSTRACTS, dim=1 << 20, weight=0.5, scheme="bm25")
    assert channel.scheme == "bm25" and not channel.unit_norm

    def halves(texts, kind):
        f = model.tokenize(texts, kind=kind)
        return channel.lexical(f["input_ids"], f["attention_mask"], torch.full((len(texts),), kind == "query"))

    got = (halves(QUERIES, "query") @ halves(ABSTRACTS, "document").T).numpy()
    expected = _bm25_by_hand([t.lower() for t in ABSTRACTS], QUERIES, channel.k1, channel.b)
    assert expected[0].argmax() == 0 and expected[0, 2] > 0 and not expected[3].any()  # the oracle is not trivial
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.max() <= 1.0


def test_bm25_model_scores_by_dot_product_and_round_trips_through_sentence_transformers(tmp_path, tiny_bert_dir):
    """Saved and loaded (our loader and sentence-transformers with the opt-in), a BM25 model gives the same
    vectors; `encode_query` gets the query half, plain `encode` the document half; similarity is dot."""
    import json

    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir))
    model.lexical = fit_lexical_channel(model, ABSTRACTS, dim=256, weight=0.4, scheme="bm25", seed=3)
    assert model.similarity_fn_name == "dot"
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "dot"
    dense_config = json.loads((tmp_path / "m" / "dense" / "config_sentence_transformers.json").read_text())
    assert dense_config["similarity_fn_name"] == "cosine" and not (tmp_path / "m" / "sparse").exists()

    queries, documents = model.encode(QUERIES, kind="query"), model.encode(ABSTRACTS, kind="document")
    assert not np.allclose(queries[:, 32:], model.encode(QUERIES, kind="document")[:, 32:])  # two sides differ
    again = EmbeddingModel.from_pretrained(str(tmp_path / "m"))
    np.testing.assert_allclose(again.encode(QUERIES, kind="query"), queries, atol=1e-6)
    st = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")
    st.max_seq_length = 32
    np.testing.assert_allclose(st.encode_query(QUERIES), queries, atol=1e-5)
    st.max_seq_length = 64
    np.testing.assert_allclose(st.encode_document(ABSTRACTS), documents, atol=1e-5)
    np.testing.assert_allclose(st.encode(ABSTRACTS), documents, atol=1e-5)
    np.testing.assert_allclose(st.similarity(queries, documents).numpy(), queries @ documents.T, atol=1e-5)


# ---------------------------------------------------------------- the channel's own cut
LONG_ABSTRACTS = [("Cell division in budding yeast. " * 12) + "Zebrafish hearts regenerate after injury.", *ABSTRACTS[1:]]


def test_channel_with_its_own_cut_scores_the_whole_document_and_the_dense_half_does_not_change(tiny_bert_dir):
    """max_length on the channel: the lexical half scores BM25 over the whole text (bm25s by hand, on
    the full abstracts), where the dense half, and a channel without the key, stop at the model's cut."""
    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir), max_length=16)
    assert len(model.tokenizer(LONG_ABSTRACTS[0])["input_ids"]) > 4 * 16  # the match lies past the dense cut
    dense = model.encode(LONG_ABSTRACTS)
    model.lexical = fit_lexical_channel(model, LONG_ABSTRACTS, dim=1 << 20, weight=0.5, scheme="bm25", max_length=512)
    assert model.lexical.max_length == 512
    queries, documents = model.encode(QUERIES, kind="query"), model.encode(LONG_ABSTRACTS)
    np.testing.assert_allclose(documents[:, :32], np.sqrt(0.5) * dense, atol=1e-6)
    lexical = 2 * (queries[:, 32:] @ documents[:, 32:].T)  # each half carries sqrt(w) = sqrt(0.5)
    expected = _bm25_by_hand([t.lower() for t in LONG_ABSTRACTS], QUERIES, model.lexical.k1, model.lexical.b)
    assert expected[0, 0] > 0
    np.testing.assert_allclose(lexical, expected, atol=1e-5)

    model.lexical = fit_lexical_channel(model, LONG_ABSTRACTS, dim=1 << 20, weight=0.5, scheme="bm25")
    cut = model.encode(QUERIES, kind="query")[:1, 32:] @ model.encode(LONG_ABSTRACTS[:1])[:, 32:].T
    assert model.lexical.max_length is None and float(cut.item()) == 0.0  # the dense half's 16 tokens: yeast only


@pytest.mark.parametrize("scheme", ["bm25", "tfidf"])
def test_own_cut_round_trips_through_sentence_transformers_and_the_dense_half_needs_no_remote_code(
        tmp_path, tiny_bert_dir, scheme):
    """Saved with its own cut, the model's first module tokenises for the channel too: sentence-transformers
    (with the opt-in) gives our vectors; the dense half is the plain Transformer again and loads without it."""
    import json

    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir), max_length=16)
    model.lexical = fit_lexical_channel(model, LONG_ABSTRACTS, dim=256, weight=0.4, scheme=scheme, seed=3, max_length=512)
    model.save_pretrained(tmp_path / "m")
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    assert modules[0]["type"] == "embed.modeling.lexical.LexicalInputTransformer"
    queries, documents = model.encode(QUERIES, kind="query"), model.encode(LONG_ABSTRACTS, kind="document")
    again = EmbeddingModel.from_pretrained(str(tmp_path / "m"))
    assert again.lexical.max_length == 512 and again.settings.max_length == 16
    np.testing.assert_allclose(again.encode(LONG_ABSTRACTS, kind="document"), documents, atol=1e-6)
    st = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(st.encode_document(LONG_ABSTRACTS), documents, atol=1e-5)
    np.testing.assert_allclose(st.encode_query(QUERIES), queries, atol=1e-5)
    dense_modules = json.loads((tmp_path / "m" / "dense" / "modules.json").read_text())
    assert dense_modules[0]["type"] == "sentence_transformers.models.Transformer"
    plain = SentenceTransformer(str(tmp_path / "m" / "dense"), device="cpu")
    np.testing.assert_allclose(plain.encode_document(LONG_ABSTRACTS), documents[:, :32] / np.sqrt(0.6), atol=1e-5)


def test_channel_saved_before_the_cut_existed_reads_the_dense_half_cut(tmp_path, tiny_bert_dir):
    import json

    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir), max_length=16)
    model.lexical = fit_lexical_channel(model, LONG_ABSTRACTS, dim=256, weight=0.4, scheme="bm25")
    expected = model.encode(LONG_ABSTRACTS)
    model.save_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "3_LexicalChannel" / "lexical_channel.json"
    old = {k: v for k, v in json.loads(config.read_text()).items() if k != "max_length"}
    config.write_text(json.dumps(old))
    again = EmbeddingModel.from_pretrained(str(tmp_path / "m"))
    assert again.lexical.max_length is None
    np.testing.assert_allclose(again.encode(LONG_ABSTRACTS), expected, atol=1e-6)
