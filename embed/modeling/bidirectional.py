"""Make a Llama-family decoder attend bidirectionally (the Tevatron recipe, for transformers 5.x).

A decoder LLM used as an embedding model reads the whole text at once, so every token should see
every other token. Three things must flip together, or the model silently stays causal
(FIELD.md, NVIDIA AutoModel PR #1349):

1. the padding mask must be built non-causal: `config.is_causal = False` makes
   `masking_utils.create_causal_mask` return `create_bidirectional_mask(...)` instead;
2. SDPA must not fall back to its own `is_causal`: without padding the mask builder returns None
   and SDPA then obeys the `is_causal` flag, so every attention module gets `is_causal = False`;
3. nothing may rely on `_update_causal_mask`, which transformers >= 4.53 never calls.

Both switches live on this model instance (its config object and its modules): nothing global is
patched. Because `config.is_causal` is saved in `config.json`, a plain `AutoModel.from_pretrained`
of a saved bidirectional model attends bidirectionally again (transformers 5.x forwards
`config.is_causal` as the `is_causal` kwarg of every attention call), so sentence-transformers'
stock `Transformer` module reloads it without any custom code or `trust_remote_code`.
"""
from __future__ import annotations

import logging

from torch import nn

from embed.errors import ConfigError

logger = logging.getLogger(__name__)

# Architectures whose modeling code builds its mask with masking_utils.create_causal_mask /
# create_sliding_window_causal_mask (both honour config.is_causal) and whose attention modules
# carry an `is_causal` flag. Others may need different switches: refuse them instead of guessing.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def make_bidirectional(model: nn.Module) -> int:
    """Switch `model` (a base model, a *ForCausalLM or a peft wrapper of one) to bidirectional attention.

    Returns the number of attention modules patched. Idempotent: patching again changes nothing.
    Raises ConfigError (a ValueError) for an architecture outside SUPPORTED_MODEL_TYPES.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"make_bidirectional: architecture '{model_type}' ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    attention_modules = [m for m in model.modules() if "is_causal" in vars(m)]
    if not attention_modules:
        raise RuntimeError(
            f"make_bidirectional: found no attention module with an `is_causal` flag in {type(model).__name__}; "
            "this transformers version builds attention differently"
        )
    config.is_causal = False
    for module in attention_modules:
        module.is_causal = False
    logger.info("make_bidirectional: %s (%s): %d attention modules patched",
                type(model).__name__, model_type, len(attention_modules))
    return len(attention_modules)
