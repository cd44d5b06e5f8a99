"""The encoders an evaluation scores, built so that each network runs over a corpus once.

A model with a lexical channel (embed.modeling.lexical) is two systems in one: its dense half and
the hybrid [dense ; lexical]. The lexical half needs token ids only, no forward pass, so the
hybrid's embedding is the dense half's embedding with the channel appended. `CachedEncoder`
remembers what the network computed, by (kind, texts); `HybridEncoder` appends a channel to it.
Scoring the dense half and the hybrid then costs one pass of the network, not two; so does
scoring the base model and the untrained hybrid (base + the same channel).

`load_as_published` loads the base model the way its publisher saved it, so the `base` column is
the model a user would download, not the base model under this recipe's settings.

`SparseAsDense` scores the exported sparse half (embed.modeling.sparse_export) through the same
mteb path as the rest: mteb searches dense arrays, so its vectors come back vocabulary-sized.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from embed.modeling.lexical import append_channel
from embed.modeling.model import (
    EXTRA_CONFIG,
    EmbeddingModel,
    EncoderSettings,
    load_from_config,
    read_saved_settings,
)
from embed.runtime import resolve_model


def _texts_key(kind: str, texts: list[str]) -> tuple[str, str]:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return kind, h.hexdigest()


class _EncoderView(nn.Module):
    """What mteb_eval reads besides `encode`: the settings of the network underneath."""

    network: EmbeddingModel

    settings = property(lambda self: self.network.settings)
    normalize = property(lambda self: self.network.normalize)
    similarity_fn_name = property(lambda self: self.network.similarity_fn_name)
    query_prompt = property(lambda self: self.network.query_prompt)
    document_prompt = property(lambda self: self.network.document_prompt)


class CachedEncoder(_EncoderView):
    """An EmbeddingModel whose `encode` outputs are kept by (kind, texts) until `clear()`.

    mteb encodes a task's queries and corpus in the same batches for every system scored on it,
    so a second system built on this network finds them here instead of running it again."""

    def __init__(self, network: EmbeddingModel):
        super().__init__()
        self.network = network
        self._outputs: dict[tuple[str, str], np.ndarray] = {}

    def encode(self, texts: Iterable[str], kind: str = "document", batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
        texts = list(texts)
        key = _texts_key(kind, texts)
        if key not in self._outputs:
            self._outputs[key] = self.network.encode(texts, kind=kind, batch_size=batch_size,
                                                     show_progress=show_progress)
        return self._outputs[key].copy()  # callers may normalise in place

    def clear(self) -> None:
        """Drop the kept outputs (after each task: a corpus's embeddings are not needed twice)."""
        self._outputs.clear()


class HybridEncoder(_EncoderView):
    """[dense ; lexical]: the dense encoder's output with a lexical channel appended.

    Equal to an EmbeddingModel carrying the channel (same tokenisation, same prompt masking, the
    channel's own forward), but the network runs only inside `dense`, which may be shared."""

    def __init__(self, dense: CachedEncoder, channel: nn.Module):
        super().__init__()
        self.dense = dense
        self.channel = channel
        net = dense.network
        # the tokeniser view of a model carrying the channel: it masks the prompt out of lexical matching
        self.network = EmbeddingModel(net.backbone, net.tokenizer, net.pooling, net.settings, lexical=channel)

    @torch.inference_mode()
    def encode(self, texts: Iterable[str], kind: str = "document", batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
        texts = list(texts)
        dense = self.dense.encode(texts, kind=kind, batch_size=batch_size, show_progress=show_progress)
        out = np.zeros((len(texts), dense.shape[1] + self.channel.dim), dtype=np.float32)
        start = 0
        for rows in append_channel(self.network, texts, torch.from_numpy(dense), kind, batch_size):
            out[start:start + len(rows)] = rows.float().cpu().numpy()
            start += len(rows)
        return out


class SparseAsDense(nn.Module):
    """A saved SparseEncoder behind EmbeddingModel's `encode`: float32 rows of vocabulary size.

    Dense on purpose: mteb's search multiplies dense arrays (SciFact's corpus is 5,183 x 30,522 x 4 B =
    0.6 GB). Its `settings` describe it for the results' identity and revision: no prompt (the export
    has none) and one token limit, special tokens counted as EncoderSettings counts them."""

    def __init__(self, folder: str | Path):
        super().__init__()
        from sentence_transformers import SparseEncoder

        self.sparse = SparseEncoder(str(folder), device="cpu")
        limit = self.sparse.max_seq_length + self.sparse.tokenizer.num_special_tokens_to_add()
        self.settings = EncoderSettings(pooling="sparse", normalize=True, max_length=limit,
                                        query_max_length=limit, pool_prompt_tokens=False)

    normalize = property(lambda self: self.settings.normalize)
    query_prompt = property(lambda self: self.settings.query_prompt)
    document_prompt = property(lambda self: self.settings.document_prompt)

    @torch.inference_mode()
    def encode(self, texts: Iterable[str], kind: str = "document", batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.sparse.get_embedding_dimension()), dtype=np.float32)
        if texts:
            encode = self.sparse.encode_query if kind == "query" else self.sparse.encode_document
            rows = encode(texts, batch_size=batch_size, show_progress_bar=show_progress, save_to_cpu=True).coalesce()
            out[tuple(rows.indices().numpy())] = rows.values().float().numpy()
        return out


def load_as_published(name_or_path: str, model_cfg) -> tuple[EmbeddingModel, str]:
    """The base model with its own saved settings (prompts, pooling, max lengths), not the recipe's.

    A sentence-transformers folder publishes one token limit (`max_seq_length`), which it applies
    to queries too; our own layout also saves a query limit. A plain checkpoint (or a hub id, whose
    files our loader does not read) publishes no embedding settings, so the recipe's are used.
    Loading options (dtype, attention kernel, trust_remote_code) are the recipe's either way.
    Returns the model and where its settings came from ("published" or "recipe")."""
    folder = Path(resolve_model(name_or_path))
    if not (folder / "modules.json").is_file():
        return load_from_config(model_cfg, name_or_path), "recipe"
    saved, _ = read_saved_settings(folder)
    query_max_length = None if (folder / EXTRA_CONFIG).is_file() else saved.max_length
    model = EmbeddingModel.from_pretrained(
        name_or_path, attn_implementation=model_cfg.attn_implementation, dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code, query_max_length=query_max_length)
    return model, "published"
