"""load_nemotron_backbone: a llama-nemotron-embed style checkpoint loads into a plain bidirectional LlamaModel."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from embed.modeling.bidirectional import make_bidirectional
from embed.modeling.nemotron import (
    is_llama_bidirectional_checkpoint,
    load_nemotron_backbone,
)


def tiny_config():
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100)


def rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def as_nemotron_checkpoint(path):
    """What the hub repo's config.json says: the remote-code class, its auto_map and pooling keys."""
    rewrite_config(path, model_type="llama_bidirec", architectures=["LlamaBidirectionalModel"], pooling="avg",
                   temperature=1.0, auto_map={"AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
                                              "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel"})


@pytest.fixture
def nemotron_dir(tmp_path):
    torch.manual_seed(0)
    original = LlamaModel(tiny_config()).eval()
    original.save_pretrained(tmp_path)
    as_nemotron_checkpoint(tmp_path)
    return tmp_path, original


def test_weights_map_one_to_one_and_model_is_bidirectional(nemotron_dir):
    path, original = nemotron_dir
    assert is_llama_bidirectional_checkpoint(str(path))
    loaded = load_nemotron_backbone(str(path)).eval()
    assert type(loaded) is LlamaModel and loaded.config.model_type == "llama"
    expected, actual = original.state_dict(), loaded.state_dict()
    assert set(actual) == set(expected) == set(load_file(path / "model.safetensors"))
    assert all(torch.equal(actual[name], expected[name]) for name in expected)

    make_bidirectional(original)
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                           original(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert loaded.config.is_causal is False and all(layer.self_attn.is_causal is False for layer in loaded.layers)


def test_causal_lm_checkpoint_loads_without_its_lm_head(tmp_path):
    """meta-llama style: `model.`-prefixed names plus lm_head.weight."""
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_config())
    original.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    loaded = load_nemotron_backbone(str(tmp_path))
    assert not is_llama_bidirectional_checkpoint(str(tmp_path))
    expected = original.model.state_dict()
    assert all(torch.equal(loaded.state_dict()[name], expected[name]) for name in expected)


def test_missing_weight_raises(nemotron_dir):
    path, _ = nemotron_dir
    weights = load_file(path / "model.safetensors")
    del weights["layers.1.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.down_proj.weight"):
        load_nemotron_backbone(str(path))


@pytest.mark.parametrize("changes, message", [({"model_type": "bert"}, "model_type 'bert'"),
                                               ({"pooling": "last"}, "pooling 'last'")])
def test_foreign_checkpoint_raises(nemotron_dir, changes, message):
    path, _ = nemotron_dir
    rewrite_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        load_nemotron_backbone(str(path))
