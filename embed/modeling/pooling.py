"""Pooling: token states [B, T, H] -> one vector [B, H], chosen by name from a registry.

Every module takes `(token_embeddings, attention_mask, pooling_mask)`. `attention_mask` says
which positions are real tokens (used to find the first/last token under either padding
side); `pooling_mask` is the attention mask with instruction tokens zeroed when the recipe
excludes them from pooling (NV-Embed), so mean and latent-attention pooling average over
the text alone while attention still sees the instruction.

The three classic modes save as sentence-transformers' own `Pooling` module, so a model
trained here loads in plain sentence-transformers with no code of ours.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn


def exclude_prompt(attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Pooling mask without each row's first `prompt_length` real tokens (left or right padding)."""
    real_token_rank = attention_mask.cumsum(dim=1)
    return attention_mask * (real_token_rank > prompt_length).to(attention_mask.dtype)


class MeanPooling(nn.Module):
    st_mode = "mean"

    def forward(self, token_embeddings, attention_mask, pooling_mask):
        mask = pooling_mask.unsqueeze(-1).to(torch.float32)                  # [B, T, 1]
        summed = (token_embeddings.to(torch.float32) * mask).sum(dim=1)       # [B, H]
        counts = mask.sum(dim=1).clamp(min=1e-9)                              # [B, 1]
        return (summed / counts).to(token_embeddings.dtype)


def _gather_positions(token_embeddings, positions):
    index = positions.view(-1, 1, 1).expand(-1, 1, token_embeddings.size(-1))  # [B, 1, H]
    return token_embeddings.gather(1, index).squeeze(1)                         # [B, H]


class CLSPooling(nn.Module):
    """The first real token (position 0 under right padding, after the pads under left)."""

    st_mode = "cls"

    def forward(self, token_embeddings, attention_mask, pooling_mask):
        first = attention_mask.to(torch.int32).argmax(dim=1)                  # [B]
        return _gather_positions(token_embeddings, first)


class LastTokenPooling(nn.Module):
    """The last real token: what a causal decoder has read everything before."""

    st_mode = "lasttoken"

    def forward(self, token_embeddings, attention_mask, pooling_mask):
        T = attention_mask.size(1)
        flipped_first = attention_mask.flip(dims=[1]).to(torch.int32).argmax(dim=1)  # [B]
        last = (T - 1) - flipped_first                                                # [B]
        return _gather_positions(token_embeddings, last)


# name -> class, or "module:Class" imported on first use (keeps heavy heads out of encoder runs)
POOLING_REGISTRY: dict[str, type[nn.Module] | str] = {
    "mean": MeanPooling,
    "cls": CLSPooling,
    "last": LastTokenPooling,
    "latent_attention": "embed.modeling.latent_attention:LatentAttentionPooling",
}
ST_MODE_TO_NAME = {"mean": "mean", "cls": "cls", "lasttoken": "last"}


def pooling_class(name: str) -> type[nn.Module]:
    if name not in POOLING_REGISTRY:
        raise ValueError(f"unknown pooling '{name}' (known: {', '.join(POOLING_REGISTRY)})")
    entry = POOLING_REGISTRY[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(module), cls)
    return entry


def build_pooling(name: str, hidden_size: int, **kwargs) -> nn.Module:
    """A fresh pooling module; parameter-free modes ignore `hidden_size` and `kwargs`."""
    cls = pooling_class(name)
    if getattr(cls, "st_mode", None):
        return cls()
    return cls(hidden_size, **kwargs)
