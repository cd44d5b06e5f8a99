"""Load llama-nemotron-embed-1b-v2 into our own bidirectional LlamaModel, without its remote code.

Its checkpoint is a `LlamaBidirectionalModel` (config `model_type: llama_bidirec`, code shipped in
the hub repo): a LlamaModel subclass that only flips the attention switches make_bidirectional
flips and adds `pooling: avg` / `temperature` config keys. Its weights therefore carry exactly
LlamaModel's names, and the state-dict mapping is the identity:

    embed_tokens.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.{input,post_attention}_layernorm.weight
    norm.weight

A LlamaForCausalLM checkpoint (e.g. meta-llama/Llama-3.2-1B) stores the same names under
`model.` plus an `lm_head.weight`; transformers' loader strips the prefix and the LM head is
not needed for embeddings, so the same function loads a plain Llama base model.
The caller pools with a masked mean (the card's `avg`) and prefixes `query: ` / `passage: `.
"""
from __future__ import annotations

from transformers import LlamaConfig, LlamaModel

from embed.modeling.bidirectional import make_bidirectional

ACCEPTED_MODEL_TYPES = ("llama_bidirec", "llama")
# Keys that only describe the remote-code class; dropping them leaves a plain LlamaConfig.
REMOTE_CODE_KEYS = ("model_type", "architectures", "auto_map", "pooling", "temperature")
IGNORED_CHECKPOINT_KEYS = ("lm_head.weight",)


def is_llama_bidirectional_checkpoint(path: str) -> bool:
    """True for a llama-nemotron-embed style checkpoint (config.json `model_type: llama_bidirec`)."""
    return LlamaConfig.get_config_dict(path)[0].get("model_type") == "llama_bidirec"


def load_nemotron_backbone(path: str, *, dtype=None, attn_implementation: str = "sdpa",
                           quantization_config=None) -> LlamaModel:
    """A bidirectional `LlamaModel` holding the weights of the Llama(-bidirectional) checkpoint at `path`.

    `path`: a local folder or hub id with config.json + safetensors. `dtype`: torch dtype or None
    (float32). `quantization_config`: e.g. embed.modeling.peft.bnb_4bit_config() for QLoRA.
    Raises ValueError for another architecture, a non-mean pooling, or missing/unexpected weights.
    """
    raw, _ = LlamaConfig.get_config_dict(path)
    model_type = raw.get("model_type")
    if model_type not in ACCEPTED_MODEL_TYPES:
        raise ValueError(f"{path}: config.json model_type '{model_type}' is not a Llama checkpoint "
                         f"(accepted: {', '.join(ACCEPTED_MODEL_TYPES)})")
    if raw.get("pooling", "avg") != "avg":
        raise ValueError(f"{path}: config.json pooling '{raw['pooling']}': only 'avg' (mean pooling) is supported")
    config = LlamaConfig.from_dict({k: v for k, v in raw.items() if k not in REMOTE_CODE_KEYS})

    model, info = LlamaModel.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation,
        quantization_config=quantization_config, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if k not in IGNORED_CHECKPOINT_KEYS)
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: weights do not fit LlamaModel: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}")
    make_bidirectional(model)
    return model
