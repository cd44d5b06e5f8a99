"""LoRA via peft: only adapters train in the backbone, merging keeps the outputs, checkpointing keeps the grads."""
import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from embed.errors import ConfigError
from embed.modeling.bidirectional import make_bidirectional
from embed.modeling.latent_attention import LatentAttentionPooling
from embed.modeling.model import enable_gradient_checkpointing
from embed.modeling.peft import (
    apply_lora,
    bnb_4bit_config,
    lora_target_modules,
    merge_lora,
)

VOCAB = 100


def tiny_llama():
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=VOCAB))


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=VOCAB))


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def adapted_projections(model):
    """Names of the base layers that received an adapter, e.g. 'layers.0.self_attn.q_proj'."""
    return {name.split(".lora_")[0].removeprefix("base_model.model.")
            for name, _ in model.named_parameters() if ".lora_" in name}


def fill_adapters(model):
    """LoRA B starts at zero (adapter = no-op); give every adapter weight a value so merging matters."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.normal_(0.0, 0.2)


@pytest.mark.parametrize("target, projections", [
    ("attention+mlp", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
])
def test_llama_trainable_parameters_are_only_adapters_and_the_head(target, projections):
    model = apply_lora(tiny_llama(), target=target)
    head = LatentAttentionPooling(32, num_latents=8, num_heads=2, head_dim=8)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    assert adapted_projections(model) == {f"layers.{i}.{block[p]}.{p}" for i in range(2) for p in projections}
    assert all(p.requires_grad for p in head.parameters())  # the head lives outside peft: trained fully


def test_bert_targets_attention_and_ffn_but_not_the_pooler():
    model = apply_lora(tiny_bert())
    adapted = adapted_projections(model)
    layer0 = {name.removeprefix("encoder.layer.0.") for name in adapted if name.startswith("encoder.layer.0.")}
    assert layer0 == {"attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"}
    assert not any("pooler" in name for name in adapted)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_merge_gives_the_same_outputs(build):
    model = apply_lora(build(), dropout=0.0).eval()
    fill_adapters(model)
    with torch.no_grad():
        adapted = model(**inputs()).last_hidden_state
        base_only = model.get_base_model()
        with model.disable_adapter():
            without_adapters = model(**inputs()).last_hidden_state
        merged = merge_lora(model)
        merged_output = merged(**inputs()).last_hidden_state
    assert not isinstance(merged, PeftModel) and merged is base_only
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    assert not torch.allclose(adapted, without_adapters, atol=1e-3)  # the adapters do something
    assert torch.allclose(merged_output, adapted, atol=1e-5)


def test_merged_bidirectional_model_stays_bidirectional():
    backbone = tiny_llama()
    make_bidirectional(backbone)
    merged = merge_lora(apply_lora(backbone))
    assert merged.config.is_causal is False
    assert all(layer.self_attn.is_causal is False for layer in merged.layers)


def test_merge_rejects_a_plain_model():
    with pytest.raises(TypeError, match="apply_lora"):
        merge_lora(tiny_llama())


def test_gradient_checkpointing_keeps_adapter_gradients():
    def adapter_grads(checkpointing):
        model = apply_lora(tiny_llama(), dropout=0.0)
        fill_adapters(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.get_base_model().layers)
        model.train()
        model(**inputs()).last_hidden_state.pow(2).mean().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
        assert torch.allclose(checkpointed[name], plain[name], atol=1e-6), name


def test_unknown_target_or_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="model.lora.target"):
        lora_target_modules("llama", "mlp-only")
    with pytest.raises(ConfigError, match="gpt2"):
        lora_target_modules("gpt2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_qlora_without_cuda_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="QLoRA needs a CUDA GPU"):
        bnb_4bit_config()
