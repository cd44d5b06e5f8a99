"""embed.modeling.sparse_export: a model with a lexical channel saves its dense and sparse halves as
plain sentence-transformers folders (`dense/`, `sparse/`) that load without trust_remote_code."""
import json
import math

import numpy as np
import pytest
import torch

from embed.modeling.lexical import fit_lexical_channel
from embed.modeling.model import EmbeddingModel
from tests.conftest import make_tiny_bert

DOCS = ["the zebrafish heart regenerates after injury", "tax law of the river delta", "zebrafish fins and tax law",
        "a study of cell division in yeast", "the heart of the matter"]
WEIGHT = 0.3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT with prompts and a lexical channel (IDF over DOCS), saved once."""
    root = tmp_path_factory.mktemp("sparse_export")
    model = EmbeddingModel.from_pretrained(str(make_tiny_bert(root / "base", seed=3, query_prompt="zebrafish: ",
                                                              document_prompt="passage: ")))
    model.lexical = fit_lexical_channel(model, DOCS, dim=128, weight=WEIGHT)
    model.save_pretrained(root / "model")
    return model, root / "model"


def test_both_halves_are_written_with_standard_modules_only(saved):
    _, folder = saved
    for half in ("dense", "sparse"):
        types = [m["type"] for m in json.loads((folder / half / "modules.json").read_text())]
        assert types and all(t.startswith("sentence_transformers.") for t in types), (half, types)
    assert not (folder / "dense" / "3_LexicalChannel").exists()
    # the same prompts and settings files as the main folder
    for name in ("config_sentence_transformers.json", "sentence_bert_config.json", "embed_config.json"):
        assert (folder / "dense" / name).read_text() == (folder / name).read_text()


def test_dense_half_loads_without_trust_remote_code_and_equals_the_hybrids_dense_block(saved):
    from sentence_transformers import SentenceTransformer

    model, folder = saved
    dense = SentenceTransformer(str(folder / "dense"), device="cpu")  # trust_remote_code defaults to False
    assert dense.get_embedding_dimension() == 32
    texts = ["heart regenerates", "tax law of the delta"]  # short: within both token limits
    for kind in ("query", "document"):
        hybrid = model.encode(texts, kind=kind)
        assert hybrid.shape[1] == 32 + 128
        expected = hybrid[:, :32] / math.sqrt(1 - WEIGHT)
        np.testing.assert_allclose(dense.encode(texts, prompt_name=kind), expected, atol=1e-5)


def _binary_idf(tokenizer, idf: torch.Tensor, text: str, max_length: int) -> np.ndarray:
    """Expected sparse vector, by hand: each distinct token of the text as the model cuts documents
    (specials included; their IDF is 0) weighs its IDF once, then L2 normalisation."""
    ids = sorted(set(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]))
    vector = np.zeros(len(idf), dtype=np.float64)
    vector[ids] = idf.double().numpy()[ids]
    return vector / np.linalg.norm(vector)


def test_sparse_half_is_binary_presence_times_idf_normalised_without_prompt(saved):
    from sentence_transformers import SparseEncoder

    model, folder = saved
    sparse = SparseEncoder(str(folder / "sparse"), device="cpu")  # trust_remote_code defaults to False
    text = "zebrafish zebrafish zebrafish heart and tax law"  # a repeated word counts once; "zebrafish" is also the query prompt
    expected = _binary_idf(model.tokenizer, model.lexical.idf, text, model.settings.max_length)
    for encode in (sparse.encode_query, sparse.encode_document, sparse.encode):
        got = encode([text], convert_to_sparse_tensor=False)[0].numpy()
        assert got.shape == (len(model.tokenizer),)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    special = model.tokenizer.all_special_ids
    spelled = sparse.encode_document([f"{model.tokenizer.sep_token} heart"], convert_to_sparse_tensor=False)[0]
    assert spelled[special].abs().sum() == 0 and spelled.abs().sum() > 0
    assert sparse.similarity_fn_name == "dot"


def test_sparse_half_cuts_a_long_document_where_the_channel_does(saved):
    from sentence_transformers import SparseEncoder

    model, folder = saved
    sparse = SparseEncoder(str(folder / "sparse"), device="cpu")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau upsilon phi chi psi omega"
    text = " ".join(f"{w}{i}" for i, w in enumerate(words.split() * 4))  # well over the 64-token limit
    assert len(model.tokenizer(text)["input_ids"]) > 2 * model.settings.max_length
    expected = _binary_idf(model.tokenizer, model.lexical.idf, text, model.settings.max_length)
    assert not np.allclose(expected, _binary_idf(model.tokenizer, model.lexical.idf, text, 512), atol=1e-3)
    got = sparse.encode_document([text], convert_to_sparse_tensor=False)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_model_without_a_channel_writes_neither_half(tiny_bert_dir):
    assert (tiny_bert_dir / "modules.json").is_file()
    assert not (tiny_bert_dir / "dense").exists() and not (tiny_bert_dir / "sparse").exists()


def test_latent_attention_dense_half_keeps_its_head_and_says_it_needs_trust_remote_code(tmp_path):
    """The dense half of a latent-attention model holds this package's head: it loads with the opt-in,
    and equals the hybrid's dense block; the sparse half needs no opt-in either way."""
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from embed.modeling.model import LATENT_ATTENTION_ST, package_modules
    from embed.modeling.pooling import build_pooling

    model = EmbeddingModel.from_pretrained(str(make_tiny_bert(tmp_path / "base", seed=4)))
    model.pooling = build_pooling("latent_attention", 32, num_latents=4, num_heads=2, head_dim=8)
    model.settings.pooling = "latent_attention"
    model.lexical = fit_lexical_channel(model, DOCS, dim=32, weight=WEIGHT)
    model.save_pretrained(tmp_path / "model")
    assert package_modules(tmp_path / "model" / "dense") == (LATENT_ATTENTION_ST,)
    assert package_modules(tmp_path / "model" / "sparse") == ()
    dense = SentenceTransformer(str(tmp_path / "model" / "dense"), device="cpu", trust_remote_code=True)
    texts = ["heart regenerates", "tax law"]
    expected = model.encode(texts, kind="document")[:, :32] / math.sqrt(1 - WEIGHT)
    np.testing.assert_allclose(dense.encode(texts, prompt_name="document"), expected, atol=1e-5)
    SparseEncoder(str(tmp_path / "model" / "sparse"), device="cpu")
