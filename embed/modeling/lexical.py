"""A lexical channel: TF-IDF over the model's own word pieces, appended to the dense embedding.

Why: a small dense model misses the rare terms a specialised domain is searched by. On SciFact's
train pairs (a dev set the recipes never read) all-MiniLM-L6-v2 ranks at nDCG@10 65.98, TF-IDF of
its word pieces at 65.71, and the two mixed at 70-71.6: their errors differ. SPAR (Chen et al.
2022, arXiv 2110.06918) concatenates a dense retriever with a dense imitation of a lexical one, so
that one inner product scores both. Here the lexical half is exact TF-IDF, its IDF fitted on the
domain corpus (data.corpus: unlabeled, the corpus generation reads), feature-hashed into `dim`
signed buckets so the vector stays dense and fixed-size whatever the vocabulary:

    embedding = [sqrt(1 - w) * dense ; sqrt(w) * lexical]      (both halves unit-norm)
    cosine(query, document) = (1 - w) * cosine_dense + w * cosine_lexical

The channel has no trainable weights; the dense half is trained as before. `LexicalChannelST`
is the same thing as a sentence-transformers module (loading it takes trust_remote_code=True, as
for the latent-attention head). For a vector database, a saved model also holds both halves as
plain folders, the lexical one as a standard SparseEncoder (embed.modeling.sparse_export).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from embed.modeling.pooling import exclude_prompt
from embed.modeling.st_module import PackageModule

CONFIG_NAME = "lexical_channel.json"
WEIGHTS_NAME = "lexical_channel.safetensors"


class LexicalChannel(nn.Module):
    """Hashed sublinear TF-IDF of token ids, concatenated to a unit-norm dense embedding with weight w."""

    def __init__(self, idf: Tensor, dim: int, weight: float, seed: int = 0,
                 bucket: Tensor | None = None, sign: Tensor | None = None):
        """`bucket` / `sign`: the hashing tables (token id -> bucket, +-1); drawn from `seed` when not
        given. A saved channel stores them, so it never depends on torch's random stream."""
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise ValueError(f"lexical weight must be in (0, 1), got {weight}")
        if dim < 1:
            raise ValueError(f"lexical dim must be >= 1, got {dim}")
        self.dim, self.weight, self.seed = dim, weight, seed
        if bucket is None or sign is None:
            generator = torch.Generator().manual_seed(seed)
            bucket = torch.randint(0, dim, (len(idf),), generator=generator)
            sign = torch.randint(0, 2, (len(idf),), generator=generator).float() * 2 - 1
        if bucket.shape != idf.shape or sign.shape != idf.shape or int(bucket.max()) >= dim:
            raise ValueError(f"lexical tables do not fit: idf {tuple(idf.shape)}, bucket {tuple(bucket.shape)} "
                             f"(max {int(bucket.max())}, dim {dim}), sign {tuple(sign.shape)}")
        self.register_buffer("idf", idf.float())
        self.register_buffer("bucket", bucket.long())
        self.register_buffer("sign", sign.float())

    @classmethod
    def fit(cls, token_ids: Iterable[list[int]], vocab_size: int, ignore_ids: Iterable[int], dim: int,
            weight: float, seed: int = 0) -> "LexicalChannel":
        """IDF from the documents' token ids (smoothed as scikit-learn's: log((1 + N) / (1 + df)) + 1);
        `ignore_ids` (special tokens) get 0 and never count."""
        df = torch.zeros(vocab_size, dtype=torch.float64)
        n = 0
        for ids in token_ids:
            df[torch.tensor(sorted(set(ids)), dtype=torch.long)] += 1
            n += 1
        if n == 0:
            raise ValueError("lexical channel: no documents to fit the IDF on")
        idf = torch.log((1 + n) / (1 + df)) + 1
        idf[torch.tensor(sorted(set(ignore_ids)), dtype=torch.long)] = 0
        return cls(idf, dim, weight, seed)

    def lexical(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """Unit-norm hashed TF-IDF [B, dim] of each row's tokens where mask is 1."""
        counts = torch.zeros(input_ids.shape[0], len(self.idf), device=input_ids.device)
        counts.scatter_add_(1, input_ids, mask.float())
        tf_idf = torch.where(counts > 0, 1 + torch.log(counts.clamp(min=1)), counts) * self.idf
        hashed = torch.zeros(input_ids.shape[0], self.dim, device=input_ids.device)
        hashed.index_add_(1, self.bucket, tf_idf * self.sign)
        return nn.functional.normalize(hashed, dim=-1)

    def forward(self, dense: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        """[sqrt(1 - w) * dense ; sqrt(w) * lexical]; `dense` is expected unit-norm."""
        lexical = self.lexical(input_ids, mask).to(dense.dtype)
        return torch.cat([math.sqrt(1 - self.weight) * dense, math.sqrt(self.weight) * lexical], dim=-1)

    def save(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump({"dim": self.dim, "weight": self.weight, "seed": self.seed, "vocab_size": len(self.idf)}, f, indent=2)
        save_file({name: getattr(self, name).cpu().contiguous() for name in ("idf", "bucket", "sign")},
                  os.path.join(folder, WEIGHTS_NAME))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "LexicalChannel":
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            config = json.load(f)
        tables = load_file(os.path.join(folder, WEIGHTS_NAME))
        idf = tables["idf"]
        if len(idf) != config["vocab_size"]:
            raise ValueError(f"{folder}: {len(idf)} IDF entries for a vocabulary of {config['vocab_size']}")
        # channels saved before the tables were stored: drawn again from the seed, as they were then
        return cls(idf, config["dim"], config["weight"], config["seed"], tables.get("bucket"), tables.get("sign"))


class LexicalChannelST(PackageModule):
    """sentence-transformers module, after Normalize: sentence_embedding -> [dense ; lexical]."""

    config_file_name = "lexical_channel_st.json"
    config_keys = ["dense_dim"]

    def __init__(self, channel: LexicalChannel, dense_dim: int):
        super().__init__()
        self.channel, self.dense_dim = channel, dense_dim

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        # a prompt's words are in every query: they must not match documents that happen to hold them
        length = features.get("prompt_length", 0)
        length = int(length.reshape(-1)[0]) if isinstance(length, Tensor) else int(length)
        mask = exclude_prompt(features["attention_mask"], length) if length else features["attention_mask"]
        features["sentence_embedding"] = self.channel(features["sentence_embedding"], features["input_ids"], mask)
        return features

    def get_embedding_dimension(self) -> int:
        return self.dense_dim + self.channel.dim

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.channel.save(output_path)
        self.save_config(output_path)

    @classmethod
    def from_folder(cls, folder: str, **config) -> "LexicalChannelST":
        return cls(LexicalChannel.load(folder), **config)


def fit_lexical_channel(model, texts: list[str], dim: int, weight: float, seed: int = 0,
                        batch_size: int = 1024) -> LexicalChannel:
    """The channel for `model` (an EmbeddingModel) with IDF over `texts` as its tokenizer cuts them
    for documents (same truncation), streamed in batches."""
    tokenizer = model.tokenizer

    def token_ids():
        for start in range(0, len(texts), batch_size):
            yield from tokenizer(texts[start:start + batch_size], truncation=True,
                                 max_length=model.settings.max_length)["input_ids"]

    return LexicalChannel.fit(token_ids(), len(tokenizer), tokenizer.all_special_ids, dim, weight, seed)
