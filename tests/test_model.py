"""EmbeddingModel: the sentence-transformers round trip and prompt handling."""
import numpy as np
import pytest
import torch

from embed.errors import ModelLoadError
from embed.modeling.model import EmbeddingModel
from tests.conftest import make_tiny_bert

TEXTS = ["protein folding in yeast", "the tax code of 1986 and its amendments", "a"]


@pytest.mark.parametrize("pooling,pool_prompt", [("mean", True), ("mean", False), ("cls", True), ("last", True)])
def test_sentence_transformers_reproduces_our_embeddings(tmp_path, pooling, pool_prompt):
    from sentence_transformers import SentenceTransformer

    path = make_tiny_bert(tmp_path / "m", pooling=pooling, query_prompt="Instruct: find papers\nQuery: ",
                          pool_prompt_tokens=pool_prompt)
    ours = EmbeddingModel.from_pretrained(str(path))
    st = SentenceTransformer(str(path), device="cpu")
    for kind, prompt_name in (("query", "query"), ("document", None)):
        a = ours.encode(TEXTS, kind=kind)
        b = st.encode(TEXTS, prompt_name=prompt_name, normalize_embeddings=False)
        cos = (a * b).sum(1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.9999, (kind, cos)


def test_prompt_tokens_excluded_from_pooling_mask(tiny_bert_dir):
    m = EmbeddingModel.from_pretrained(str(tiny_bert_dir), query_prompt="query: ", pool_prompt_tokens=False)
    feats = m.tokenize(["hello world"], kind="query")
    n_prompt = m._prompt_length("query: ")  # [CLS] query : -> 3 tokens excluded
    assert n_prompt == 3
    assert feats["pooling_mask"][0, :n_prompt].sum() == 0
    assert torch.equal(feats["pooling_mask"][0, n_prompt:], feats["attention_mask"][0, n_prompt:])


def test_save_load_round_trip_keeps_settings(tmp_path, tiny_bert_dir):
    m = EmbeddingModel.from_pretrained(str(tiny_bert_dir), query_prompt="q: ", document_prompt="d: ", max_length=48)
    m.save_pretrained(tmp_path / "copy")
    again = EmbeddingModel.from_pretrained(str(tmp_path / "copy"))
    assert again.settings == m.settings
    assert np.allclose(again.encode(TEXTS, kind="query"), m.encode(TEXTS, kind="query"), atol=1e-6)
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    assert not list((tmp_path / "copy").glob("*.bin"))  # no pickle


def test_encode_is_normalised_and_order_preserving(tiny_bert_dir):
    m = EmbeddingModel.from_pretrained(str(tiny_bert_dir))
    all_at_once = m.encode(TEXTS, batch_size=8)
    one_by_one = np.stack([m.encode([t])[0] for t in TEXTS])
    assert np.allclose(all_at_once, one_by_one, atol=1e-5)
    assert np.allclose(np.linalg.norm(all_at_once, axis=1), 1.0, atol=1e-5)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        EmbeddingModel.from_pretrained(str(tmp_path / "nope"))


def test_bundled_minilm_alias_loads():
    m = EmbeddingModel.from_pretrained("minilm")
    assert m.settings.pooling == "mean" and m.settings.max_length == 256 and m.hidden_size == 384


def test_compile_layers_compiles_every_layer_in_place(tmp_path):
    """Regional compilation finds the layer stack, keeps parameter names and the outputs."""
    import torch
    from transformers import AutoModel

    from embed.modeling.compile import compile_layers, repeated_layers

    backbone = AutoModel.from_pretrained(make_tiny_bert(tmp_path / "model")).eval()
    names_before = [name for name, _ in backbone.named_parameters()]
    features = {"input_ids": torch.tensor([[101, 5, 6, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        before = backbone(**features).last_hidden_state
    assert repeated_layers(backbone) is backbone.encoder.layer
    assert compile_layers(backbone, backend="eager") == backbone.config.num_hidden_layers
    with torch.no_grad():
        after = backbone(**features).last_hidden_state
    assert [name for name, _ in backbone.named_parameters()] == names_before
    assert torch.allclose(before, after, atol=1e-6)
