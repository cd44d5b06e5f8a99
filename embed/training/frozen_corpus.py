"""Training the query side against a frozen corpus: a stage with `frozen_documents: true`.

The documents keep the base model's embeddings, encoded once before training (through mining's
corpus-embedding cache, so a run whose mining teacher is the base model encodes nothing again).
Each step runs the network over the queries only and pulls the student's softmax over the whole
corpus towards the mining teacher's softmax over the query's candidates (cand_ids /
cand_scores in train.jsonl, from `mine.teacher_candidates`).

Why: on a CPU a contrastive step spends nearly all its compute on documents (256 tokens each,
and a positive and a negative per query) and the teacher's scores reach the student for two
documents a query. Here a step costs the queries' forward and backward alone (2.3 s against
55 s per step of 32 queries on SciFact, README), and every query sees the teacher's whole
ranking: the hybrid teacher's lexical evidence is what the query side learns. The saved model
is still one network for queries and documents: the documents move with it after training, and
in a prototype re-encoding them changed the dense score by -0.2 (SciFact dev claims) and +0.7
(CACM) against keeping them frozen.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embed.data import load_corpus
from embed.errors import DataError
from embed.mining.miner import encode_by_token_length
from embed.modeling.lexical import append_channel
from embed.modeling.model import dense_view
from embed.retrieval.embedding_cache import corpus_embeddings, teacher_cache
from embed.runtime import default_cache_root, encode_autocast


class FrozenCorpusDistillation(nn.Module):
    """KL(teacher || student) per query, averaged over the batch.

    corpus_emb      [N, D]  the frozen documents' dense half (unit norm, scaled as the model
                            scales it in its output)
    corpus_lexical  [N, L]  sparse: the documents' lexical half when the model has a lexical
                            channel attached (train.lexical_aware), else None
    query_emb       [B, D + L] the student's queries, as the model outputs them
    cand_rows       [B, K]  corpus rows of each query's candidates, padded with -1
    teacher_scores  [B, K]  the teacher's scores of those candidates (padding ignored)

    The student's score is the model's own dot product: with a channel attached it is the hybrid's,
    so the dense half learns what the lexical half does not already give (as in contrastive
    stages). Its distribution is a softmax over all N documents, so a query is also pushed away
    from documents outside its candidate list, which get no teacher mass.
    """

    def __init__(self, corpus_emb: torch.Tensor, temperature: float, teacher_temperature: float,
                 corpus_lexical: torch.Tensor | None = None):
        super().__init__()
        if temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(f"FrozenCorpusDistillation: temperatures must be > 0, got {temperature}, {teacher_temperature}")
        # plain attributes, not buffers: never saved, never trained
        self.corpus_emb, self.corpus_lexical = corpus_emb.float(), corpus_lexical
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    def forward(self, query_emb: torch.Tensor, cand_rows: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        if cand_rows.shape != teacher_scores.shape or cand_rows.shape[0] != query_emb.shape[0]:
            raise ValueError(f"cand_rows {tuple(cand_rows.shape)} and teacher_scores {tuple(teacher_scores.shape)} "
                             f"must both be [B, K] with B = {query_emb.shape[0]}")
        dense_dim = self.corpus_emb.shape[1]
        lexical_dim = 0 if self.corpus_lexical is None else self.corpus_lexical.shape[1]
        if query_emb.shape[1] != dense_dim + lexical_dim:
            raise ValueError(f"queries have {query_emb.shape[1]} dimensions, the frozen corpus {dense_dim} + {lexical_dim}")
        mask = cand_rows >= 0
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query needs at least one candidate")
        if self.corpus_emb.device != query_emb.device:  # once: the first step moves them to the model's device
            self.corpus_emb = self.corpus_emb.to(query_emb.device)
            if self.corpus_lexical is not None:
                self.corpus_lexical = self.corpus_lexical.to(query_emb.device)
        with torch.autocast(device_type=query_emb.device.type, enabled=False):
            q = query_emb.float()
            scores = q[:, :dense_dim] @ self.corpus_emb.T                                   # [B, N]
            if self.corpus_lexical is not None:  # no gradient flows here: the channel has no weights
                scores = scores + torch.sparse.mm(self.corpus_lexical, q[:, dense_dim:].T.contiguous()).T
            student = F.log_softmax(scores / self.temperature, dim=-1).gather(1, cand_rows.clamp(min=0))  # [B, K]
            teacher = (teacher_scores.to(q.device, torch.float32) / self.teacher_temperature).masked_fill(~mask, float("-inf"))
            log_teacher = F.log_softmax(teacher, dim=-1)
            kl = (log_teacher.exp() * (log_teacher - student)).masked_fill(~mask, 0.0).sum(-1)
        return kl.mean()


def frozen_corpus_embeddings(cfg, model, device: torch.device, rank: int, world: int, barrier: Callable[[], None],
                             log: Callable[[str], None]):
    """(dense half [N, D] float32, lexical half [N, L] sparse or None, corpus row of each document
    id, a line for the log): `model`'s documents before training, as its output would hold them.

    The dense half comes from mining's cache when it holds it (same model files, settings, corpus
    and encoding precision), else it is encoded now, sharded over processes; always by the network
    alone, so a cache entry never holds a lexical channel. With a channel attached, its document
    vectors are added from token ids (no forward pass) and the dense half is scaled as the model
    scales it."""
    corpus = load_corpus(cfg.data.corpus)
    texts = [corpus.doc_text(i) for i in range(len(corpus))]
    network = dense_view(model)  # the cache holds the network's vectors, never a channel's
    autocast, precision = encode_autocast(device, cfg.mine.encode_precision)
    cache = teacher_cache(network, cfg.model.name_or_path, cfg.model.dtype, corpus, texts,
                          default_cache_root(cfg.mine.cache_dir), precision=precision)

    def encode(chunk: list[str]) -> np.ndarray:
        with autocast:
            return encode_by_token_length(network, chunk, "document", cfg.mine.encode_batch_size)

    emb, hit = corpus_embeddings(cache, texts, encode, chunk_size=cfg.mine.cache_chunk_size, rank=rank,
                                 world_size=world, barrier=barrier, log=log)
    dense, lexical = torch.from_numpy(np.asarray(emb, dtype=np.float32)), None
    if model.lexical is not None:  # [scaled dense ; lexical] as the model outputs it; the lexical half kept sparse
        halves = [(rows[:, :dense.shape[1]], rows[:, dense.shape[1]:].to_sparse())
                  for rows in append_channel(model, texts, dense, "document", batch_size=256)]
        dense = torch.cat([d for d, _ in halves])
        lexical = torch.cat([lx for _, lx in halves]).coalesce()
    note = (f"frozen documents: {dense.shape[0]} x {dense.shape[1]}"
            + (f" + a lexical half of {lexical.shape[1]} buckets" if lexical is not None else "")
            + f" from {cfg.data.corpus} ({'cache hit' if hit else 'encoded'}, {precision}, {cache.dir})")
    return dense, lexical, dict(corpus.index), note


def check_candidates(examples, corpus_rows: dict[str, int], stage, corpus_path: str) -> None:
    """Every candidate of a frozen-documents stage must be a document of data.corpus: train.jsonl
    mined on another corpus would otherwise point at the wrong rows."""
    for ex in examples:
        missing = next((d for d in ex.cand_ids if d not in corpus_rows), None)
        if missing is not None:
            raise DataError(f"stage '{stage.name}': candidate '{missing}' of query '{ex.query[:60]}' is not a document "
                            f"of data.corpus {corpus_path} (train.jsonl mined on another corpus?)")
