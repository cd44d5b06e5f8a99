"""LoRA and QLoRA for the embedding backbone through peft (NV-Embed: r=16, alpha=32, dropout 0.1).

`apply_lora` freezes the backbone and adds adapters to its attention (and MLP) projections. The
pooling head is not part of the backbone: the caller keeps it fully trainable and gives it its
own learning rate (`model.latent_attention.learning_rate`), since a fresh head has nothing to
preserve. Before saving, `merge_lora` folds the adapters into the weights, so the saved model is
a plain transformers model that loads without peft.

QLoRA (`load_in_4bit`) keeps the frozen base weights in 4-bit NF4 via bitsandbytes; it needs CUDA.
"""
from __future__ import annotations

import importlib.util

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from torch import nn
from transformers import AutoModel, PreTrainedModel

from embed.errors import ConfigError
from embed.modeling.nemotron import (
    is_llama_bidirectional_checkpoint,
    load_nemotron_backbone,
)
from embed.runtime import has_native_bf16

# Projection names per family, as peft suffix matches (`key == name or key.endswith("." + name)`).
# BERT's "output.dense" matches both the attention output and the FFN output, never `pooler.dense`.
_LLAMA_PROJECTIONS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
                      "mlp": ["gate_proj", "up_proj", "down_proj"]}
_BERT_PROJECTIONS = {"attention": ["query", "key", "value", "attention.output.dense"],
                     "mlp": ["intermediate.dense", "output.dense"]}
PROJECTIONS_BY_MODEL_TYPE = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _LLAMA_PROJECTIONS),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), _BERT_PROJECTIONS),
}
TARGETS = {"attention": ("attention",), "attention+mlp": ("attention", "mlp")}


def lora_target_modules(model_type: str, target: str = "attention+mlp") -> list[str]:
    """peft `target_modules` for a model type and a recipe `model.lora.target` value."""
    if target not in TARGETS:
        raise ConfigError(f"key 'model.lora.target': '{target}' is not one of {', '.join(TARGETS)}")
    if model_type not in PROJECTIONS_BY_MODEL_TYPE:
        raise ConfigError(f"LoRA: no projection names known for model type '{model_type}'; "
                          f"supported: {', '.join(PROJECTIONS_BY_MODEL_TYPE)}")
    projections = PROJECTIONS_BY_MODEL_TYPE[model_type]
    return [name for part in TARGETS[target] for name in projections[part]]


def apply_lora(backbone: PreTrainedModel, r: int = 16, alpha: int = 32, dropout: float = 0.1,
               target: str = "attention+mlp") -> PeftModel:
    """Wrap `backbone` in a peft model: base weights frozen, LoRA adapters trainable."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=TaskType.FEATURE_EXTRACTION,
                        target_modules=lora_target_modules(backbone.config.model_type, target))
    return get_peft_model(backbone, config)


def merge_lora(backbone: nn.Module) -> PreTrainedModel:
    """Fold the adapters into the base weights and drop peft: the plain model to save."""
    if not isinstance(backbone, PeftModel):
        raise TypeError(f"merge_lora expects a peft model from apply_lora, got {type(backbone).__name__}")
    return backbone.merge_and_unload()


def bnb_4bit_config(compute_dtype: torch.dtype | None = None):
    """QLoRA's quantisation: NF4 with double quantisation. Needs CUDA and bitsandbytes.

    `compute_dtype` None: bfloat16 on sm_80+, float16 below (a T4 has no native bf16, FIELD.md).
    """
    if not torch.cuda.is_available():
        raise ConfigError("key 'model.lora.load_in_4bit': QLoRA needs a CUDA GPU (bitsandbytes 4-bit); none is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("key 'model.lora.load_in_4bit': QLoRA needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if has_native_bf16(torch.device("cuda")) else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_in_4bit(name_or_path: str, *, attn_implementation: str = "sdpa", compute_dtype: torch.dtype | None = None,
                 gradient_checkpointing: bool = True) -> PreTrainedModel:
    """A 4-bit backbone ready for apply_lora: frozen, norms and embeddings upcast to float32 by peft.

    llama-nemotron-embed checkpoints load through embed.modeling.nemotron (no remote code, bidirectional);
    anything else through AutoModel.
    """
    quantization = bnb_4bit_config(compute_dtype)
    kwargs = {"dtype": quantization.bnb_4bit_compute_dtype, "attn_implementation": attn_implementation,
              "quantization_config": quantization}
    if is_llama_bidirectional_checkpoint(name_or_path):
        model = load_nemotron_backbone(name_or_path, **kwargs)
    else:
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
