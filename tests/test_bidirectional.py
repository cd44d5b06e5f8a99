"""make_bidirectional: the last token must reach the first one after the patch, and not before it.

Tiny random decoders (hidden 32, 2 layers, vocab 100). The first and last *real* tokens are
compared, so the same check covers unpadded, right-padded and left-padded batches.
"""
import logging

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
)

from embed.errors import ConfigError
from embed.modeling.bidirectional import make_bidirectional

VOCAB = 100
DECODERS = {"llama": (LlamaConfig, LlamaModel), "qwen2": (Qwen2Config, Qwen2Model),
            "mistral": (MistralConfig, MistralModel), "qwen3": (Qwen3Config, Qwen3Model)}


def tiny_decoder(kind: str, attn_implementation: str = "sdpa"):
    config_class, model_class = DECODERS[kind]
    torch.manual_seed(0)
    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                          attn_implementation=attn_implementation)
    return model_class(config).eval()


def batch(padding: str):
    """ids [3, 8] and mask; with padding, rows 0 and 1 have 5 and 7 real tokens, row 2 is full."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 8), generator=generator)
    mask = torch.ones_like(ids)
    if padding != "none":
        for row, real in ((0, 5), (1, 7)):
            if padding == "right":
                mask[row, real:] = 0
            else:
                mask[row, :8 - real] = 0
    return ids, mask


def first_real(mask):
    return mask.argmax(dim=1)


def last_real(mask):
    return mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)


def with_changed_tokens(ids, positions):
    changed = ids.clone()
    rows = torch.arange(ids.shape[0])
    changed[rows, positions] = ids[rows, positions] % (VOCAB - 1) + 1  # another non-zero id
    return changed


@torch.no_grad()
def states_at(model, ids, mask, positions):
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(ids.shape[0]), positions]


def first_token_shift(model, ids, mask, pass_mask=True):
    """Per row: how far the first real token's state moves when the last real token changes."""
    changed = with_changed_tokens(ids, last_real(mask))
    model_mask = mask if pass_mask else None
    before, after = (states_at(model, x, model_mask, first_real(mask)) for x in (ids, changed))
    return (before - after).abs().amax(dim=1)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_last_token_reaches_first_token_only_after_patch(kind, attn_implementation, padding):
    model = tiny_decoder(kind, attn_implementation)
    ids, mask = batch(padding)
    assert torch.all(first_token_shift(model, ids, mask) < 1e-6), "a causal model must not see the future"

    make_bidirectional(model)

    assert torch.all(first_token_shift(model, ids, mask) > 1e-3), "every row's first token must see its last"


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_stays_masked_after_patch(attn_implementation, padding):
    model = tiny_decoder("llama", attn_implementation)
    make_bidirectional(model)
    ids, mask = batch(padding)
    pad_position = (1 - mask).argmax(dim=1)[:2]  # a pad position of rows 0 and 1
    changed = ids.clone()
    changed[[0, 1], pad_position] = ids[[0, 1], pad_position] % (VOCAB - 1) + 1
    positions = first_real(mask)
    assert torch.allclose(states_at(model, ids, mask, positions), states_at(model, changed, mask, positions), atol=1e-6)


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_other_allowed_architectures(kind):
    model = tiny_decoder(kind)
    ids, mask = batch("right")
    assert torch.all(first_token_shift(model, ids, mask) < 1e-6)
    assert make_bidirectional(model) == 2
    assert torch.all(first_token_shift(model, ids, mask) > 1e-3)


def test_patching_twice_is_harmless(caplog):
    model = tiny_decoder("llama")
    ids, mask = batch("right")
    with caplog.at_level(logging.INFO, logger="embed.modeling.bidirectional"):
        first = make_bidirectional(model)
    expected = states_at(model, ids, mask, first_real(mask))
    second = make_bidirectional(model)
    assert first == second == 2
    assert "2 attention modules patched" in caplog.text
    assert torch.equal(states_at(model, ids, mask, first_real(mask)), expected)


def test_causal_lm_wrapper_is_patched_too():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_decoder("llama").config).eval()
    assert make_bidirectional(model) == 2
    assert model.model.config.is_causal is False
    assert all(layer.self_attn.is_causal is False for layer in model.model.layers)


@pytest.mark.parametrize("model", [
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB)),
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB)),
], ids=["gpt2", "bert"])
def test_unsupported_architecture_raises_clear_error(model):
    model_type = model.config.model_type
    with pytest.raises(ConfigError, match=rf"'{model_type}'.*llama, mistral, qwen2, qwen3"):
        make_bidirectional(model)
    assert issubclass(ConfigError, ValueError)


def test_saved_model_reloads_bidirectional_without_custom_code(tmp_path):
    """config.json carries is_causal=false; a plain AutoModel reload attends bidirectionally, SDPA unpadded included."""
    model = tiny_decoder("llama", "sdpa")
    make_bidirectional(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids, mask = batch("none")
    positions = first_real(mask)
    assert torch.allclose(states_at(reloaded, ids, mask, positions), states_at(model, ids, mask, positions), atol=1e-6)
    assert torch.all(first_token_shift(reloaded, ids, mask) > 1e-3)
    assert torch.all(first_token_shift(reloaded, ids, mask, pass_mask=False) > 1e-3)  # no mask: SDPA's is_causal path
