"""Regional compilation: `torch.compile` each transformer layer rather than the whole model.

Every layer of a backbone has the same code and shapes, so one compiled graph serves them all:
compilation takes seconds instead of minutes, and it survives LoRA, checkpointing and the variable
lengths of padded batches better than one whole-model graph. `nn.Module.compile` compiles in place,
so parameter names (checkpoints, saved models) do not change. On an H100 it lifts a bge-base
training step from 32% to 40-42% MFU (bench/README.md, part a).
"""
from __future__ import annotations

from torch import nn


def repeated_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers: its longest ModuleList (BERT's encoder.layer,
    Llama's layers), found by structure so that wrappers such as peft's need no special case."""
    stacks = [module for module in backbone.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not stacks:
        raise ValueError(f"{type(backbone).__name__} has no stack of layers to compile")
    return max(stacks, key=len)


def compile_layers(backbone: nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer layer in place; returns how many were compiled."""
    layers = repeated_layers(backbone)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
