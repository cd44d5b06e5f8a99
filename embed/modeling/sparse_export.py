"""The two halves of a model with a lexical channel, exported as plain sentence-transformers folders.

(`sparse/` is written for a TF-IDF channel only: a BM25 channel's half is BM25 itself, which vector
databases and bm25s compute natively, as the model card shows.)

Why: the hybrid model (embed.modeling.lexical) is one vector [sqrt(1-w) dense ; sqrt(w) lexical],
which MTEB scores as is but which needs this package (trust_remote_code=True) to load, and whose
lexical half is a hashed, dense-stored 16k-dim block. Vector databases serve a dense vector and a
sparse one side by side and fuse their scores. So `EmbeddingModel.save_pretrained` also writes,
inside the same model folder (one atomic replace covers all three):

  dense/   the dense half: Transformer, Pooling, Normalize, the same prompts and settings files, no
           channel module. `SentenceTransformer(folder / "dense")` loads it without trust_remote_code
           (unless the pooling is this package's latent-attention head, which needs it either way).
           The weight and tokenizer files are hard links to the main folder's (no second copy of a
           7B backbone on disk; a copy where the filesystem refuses links).
  sparse/  the lexical half: `SparseEncoder(folder / "sparse")` from standard modules only,
           SparseStaticEmbedding (the channel's IDF as a per-token weight over the tokenizer's whole
           vocabulary) then Normalize, so that a dot product is a cosine. Similarity: dot.

Score as the hybrid does: (1 - w) * dense_cosine + w * sparse_dot, w the channel's weight.

How the sparse export differs from the in-model channel, and why it is close enough:
- binary presence x IDF (what SparseStaticEmbedding computes) instead of sublinear TF x IDF
  (1 + log count): a word repeated in a document weighs as if it appeared once;
- no hashing: one dimension per vocabulary entry, so two words never share a bucket (the channel's
  collisions are gone; the hashed signs with them);
- no prompt: the channel keeps prompt tokens out of lexical matching; the export saves empty
  prompts, so `encode_query` / `encode_document` add none either;
- truncation: the tokenizer saved with it cuts a text where the channel cuts documents (its own
  `max_length`, or the model's document limit for a channel without one), minus the special tokens
  the channel counted in it, for queries too; a channel without its own cut reads queries to
  `query_max_length` and counts a document prompt in the document limit.
Special tokens weigh 0, as in the channel (SparseStaticEmbedding adds none, but a text may spell one).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from sentence_transformers import SparseEncoder
from sentence_transformers.base.modules import Normalize
from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding

from embed.modeling.lexical import LexicalChannel, LexicalChannelST

DENSE_DIR = "dense"
SPARSE_DIR = "sparse"
LEXICAL_CHANNEL_TYPE = f"{LexicalChannelST.__module__}.{LexicalChannelST.__qualname__}"
NOT_COPIED = {"modules.json", "README.md", "sentence_bert_config.json"}  # the dense half writes its own; the card is the main folder's
# the plain first module of a dense half (spelled here: embed.modeling.model imports this module)
ST_TRANSFORMER = "sentence_transformers.models.Transformer"


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_dense_half(folder: Path) -> Path:
    """folder/dense: the saved model `folder` as it is, minus its lexical channel module."""
    out = folder / DENSE_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if m["type"] != LEXICAL_CHANNEL_TYPE]
    # the first module tokenises for the channel too when it has its own cut: the dense half's is the plain one
    modules = [{**m, "type": ST_TRANSFORMER} if m["idx"] == 0 and m["type"].startswith("embed.") else m for m in modules]
    for path in folder.iterdir():
        if path.is_file() and path.name not in NOT_COPIED:
            _link_or_copy(path, out / path.name)
    transformer_config = folder / "sentence_bert_config.json"
    if transformer_config.is_file():
        config = json.loads(transformer_config.read_text())
        config.pop("lexical_max_length", None)
        (out / transformer_config.name).write_text(json.dumps(config, indent=2))
    for m in modules:
        if m["path"]:
            shutil.copytree(folder / m["path"], out / m["path"], copy_function=_link_or_copy)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    settings = out / "config_sentence_transformers.json"
    if settings.is_file() and any(m["type"].endswith("Normalize") for m in modules):
        config = json.loads(settings.read_text())
        if config.get("similarity_fn_name") != "cosine":  # a BM25 channel made the whole model's "dot"
            config["similarity_fn_name"] = "cosine"
            settings.unlink()  # a hard link to the main folder's file: write a file of its own
            settings.write_text(json.dumps(config, indent=2))
    return out


def sparse_encoder(tokenizer, channel: LexicalChannel, max_length: int) -> SparseEncoder:
    """The channel's lexical half as a SparseEncoder: binary presence x IDF, L2-normalised, no prompt.

    `max_length`: the model's document token limit, special tokens included (as the channel counts it)."""
    tokenizer = copy.deepcopy(tokenizer)  # the model's own tokenizer keeps its limit
    tokenizer.model_max_length = max_length - tokenizer.num_special_tokens_to_add()
    vocab_size = len(tokenizer.get_vocab())
    if vocab_size < len(channel.idf):
        raise ValueError(f"lexical channel has {len(channel.idf)} IDF entries, the tokenizer only {vocab_size} tokens")
    weight = torch.zeros(vocab_size)
    weight[:len(channel.idf)] = channel.idf.detach().float().cpu()
    weight[tokenizer.all_special_ids] = 0.0
    return SparseEncoder(modules=[SparseStaticEmbedding(tokenizer, weight=weight, frozen=True), Normalize()],
                         prompts={"query": "", "document": ""}, similarity_fn_name="dot", device="cpu")


def export_sparse_half(folder: Path, tokenizer, channel: LexicalChannel, max_length: int) -> Path:
    """folder/sparse: `sparse_encoder(...)` saved (safetensors; no auto-generated card: the main
    folder's README.md describes both halves)."""
    out = folder / SPARSE_DIR
    shutil.rmtree(out, ignore_errors=True)
    sparse_encoder(tokenizer, channel, max_length).save(str(out), create_model_card=False)
    return out


def has_dense_half(folder: str | os.PathLike) -> bool:
    """True when a saved model folder holds its dense half (models saved before the export do not)."""
    return (Path(folder) / DENSE_DIR / "modules.json").is_file()


def has_sparse_half(folder: str | os.PathLike) -> bool:
    """True when a saved model folder holds its lexical half as a SparseEncoder (a TF-IDF channel's)."""
    return (Path(folder) / SPARSE_DIR / "modules.json").is_file()
