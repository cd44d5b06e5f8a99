"""Contrastive losses on embeddings: InfoNCE, teacher distillation and Matryoshka wrappers, GradCache.

Tensors only: the model, tokenizer and batching live elsewhere. Every loss takes
    query_emb       [B, D]     one row per query, L2-normalised (the model normalises)
    doc_emb         [B, G, D]  column 0: the query's positive; columns 1..G-1: its hard negatives
    doc_keys        [B, G]     int64 id of each document's TEXT (equal text => equal key), >= 0
    query_pos_keys  [B, P]     int64 keys of every positive of the query, padded with -1
The keys let the loss drop a candidate that duplicates one of the query's positives: scored as
a negative it would be a false negative (FIELD.md). Keys must agree across ranks, so they come
from a digest of the text (`embed.training.batching.text_key`), never from Python's per-process `hash()`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from embed.training.distributed import all_gather_with_grad, rank_and_world_size

Features = dict[str, torch.Tensor]


class InfoNCELoss(nn.Module):
    """InfoNCE of each query against its positive, its hard negatives and, when
    `in_batch_negatives`, every document of the global batch (other queries' positives and
    negatives, on every rank). Off is NV-Embed's stage 2: a query sees only its own G documents.

    Logits are cosine similarities / temperature, computed in fp32 whatever the input dtype
    (fp16 logits at temperature 0.05 lose the small differences the loss learns from).

    Across processes (in-batch mode, `gather_across_processes`, a process group of size W > 1),
    documents are gathered with gradients; each rank scores its own B queries against all W*B*G,
    returning the mean over its queries. No rescaling is needed to match one process on the
    joined batch: the gather's backward sums onto each rank's documents the gradient from every
    rank's loss, and DDP then averages over ranks, so the parameter gradient is
        (1/W) * sum_r d/dθ [ (1/B) sum_{i on r} l_i ]  =  d/dθ [ (1/(W*B)) sum_i l_i ].
    Queries are not gathered: no rank needs another rank's queries, and the logits stay
    [B, W*B*G] instead of [W*B, W*B*G]. The returned value is this rank's mean; average it over
    ranks (`accelerator.reduce(loss, "mean")`) to log the global loss. All ranks must have equal B.
    """

    def __init__(self, temperature: float = 0.05, in_batch_negatives: bool = True,
                 gather_across_processes: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"InfoNCELoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.gather_across_processes = gather_across_processes

    def forward(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor,
                query_pos_keys: torch.Tensor) -> torch.Tensor:
        _check_inputs(query_emb, doc_emb, doc_keys, query_pos_keys)
        batch, group, dim = doc_emb.shape
        doc_keys = doc_keys.to(doc_emb.device)
        # A query's own positive always counts among its positives, listed or not.
        pos_keys = torch.cat([doc_keys[:, :1], query_pos_keys.to(doc_emb.device)], dim=1)  # [B, 1+P]
        rows = torch.arange(batch, device=doc_emb.device)                                   # [B]

        with torch.autocast(device_type=doc_emb.device.type, enabled=False):
            queries = query_emb.float()                                                     # [B, D]
            docs = doc_emb.float()                                                          # [B, G, D]
            if self.in_batch_negatives:
                rank, world = rank_and_world_size() if self.gather_across_processes else (0, 1)
                pool = docs.reshape(batch * group, dim)                                     # [B*G, D]
                pool_keys = doc_keys.reshape(1, -1)                                         # [1, B*G]
                if world > 1:
                    pool = all_gather_with_grad(pool)                                       # [N=W*B*G, D]
                    pool_keys = all_gather_with_grad(pool_keys.view(-1)).unsqueeze(0)       # [1, N]
                logits = queries @ pool.T                                                   # [B, N]
                targets = (rank * batch + rows) * group     # [B] column of each query's positive
            else:
                pool_keys = doc_keys                                                        # [B, G]
                logits = torch.einsum("bd,bgd->bg", queries, docs)                          # [B, G]
                targets = torch.zeros_like(rows)                                            # [B]
            duplicates_positive = (pool_keys.unsqueeze(-1) == pos_keys.unsqueeze(1)).any(-1)  # [B, N|G]
            columns = torch.arange(logits.shape[1], device=logits.device)                    # [N|G]
            false_negative = duplicates_positive & (columns != targets.unsqueeze(1))         # [B, N|G]
            logits = (logits / self.temperature).masked_fill(false_negative, float("-inf"))
            return F.cross_entropy(logits, targets)


def _check_inputs(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor,
                  query_pos_keys: torch.Tensor) -> None:
    """Fail loudly on shapes and dtypes: a wrong layout would otherwise broadcast into a wrong loss."""
    if query_emb.dim() != 2 or not query_emb.is_floating_point():
        raise ValueError(f"query_emb must be a float [B, D] tensor, got {query_emb.dtype} {tuple(query_emb.shape)}")
    batch, dim = query_emb.shape
    if batch == 0:
        raise ValueError("query_emb is empty: the loss needs at least one query")
    if doc_emb.dim() != 3 or not doc_emb.is_floating_point() or doc_emb.shape[0] != batch \
            or doc_emb.shape[2] != dim or doc_emb.shape[1] == 0:
        raise ValueError(f"doc_emb must be a float [B={batch}, G>=1, D={dim}] tensor, "
                         f"got {doc_emb.dtype} {tuple(doc_emb.shape)}")
    if doc_keys.dtype != torch.int64 or doc_keys.shape != doc_emb.shape[:2]:
        raise ValueError(f"doc_keys must be int64 [B, G]={tuple(doc_emb.shape[:2])}, "
                         f"got {doc_keys.dtype} {tuple(doc_keys.shape)}")
    if query_pos_keys.dtype != torch.int64 or query_pos_keys.dim() != 2 or query_pos_keys.shape[0] != batch:
        raise ValueError(f"query_pos_keys must be int64 [B={batch}, P] padded with -1, "
                         f"got {query_pos_keys.dtype} {tuple(query_pos_keys.shape)}")
    if (doc_keys < 0).any():  # the one host-device sync of the loss
        raise ValueError("doc_keys must be >= 0 (negative values are reserved for query_pos_keys padding)")


class ListwiseDistillation(nn.Module):
    """`base_loss` plus `weight` x KL(teacher || student) over each query's own documents
    (RocketQAv2; Tevatron's distillation): the student's softmax over [positive, negatives] at its
    temperature is pulled towards the teacher's softmax over the same documents at
    `teacher_temperature`. Where InfoNCE only says "the positive first", the teacher's scores also
    say by how much, and which negatives are nearly relevant: with a hybrid (dense + BM25)
    teacher from mining, the student learns the lexical evidence its own cosine misses.

    teacher_scores [B, G] are aligned with doc_emb's columns (mining's pos_scores / neg_scores).
    """

    def __init__(self, base_loss: nn.Module, weight: float, temperature: float, teacher_temperature: float):
        super().__init__()
        if weight < 0 or temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(f"ListwiseDistillation: weight must be >= 0 and temperatures > 0, got "
                             f"{weight}, {temperature}, {teacher_temperature}")
        self.base_loss, self.weight = base_loss, weight
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    def forward(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor,
                query_pos_keys: torch.Tensor, teacher_scores: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.base_loss(query_emb, doc_emb, doc_keys, query_pos_keys)
        if not self.weight:
            return loss
        if teacher_scores is None or teacher_scores.shape != doc_emb.shape[:2]:
            raise ValueError(f"teacher_scores must be [B, G]={tuple(doc_emb.shape[:2])}, got "
                             f"{None if teacher_scores is None else tuple(teacher_scores.shape)}")
        with torch.autocast(device_type=doc_emb.device.type, enabled=False):
            student = torch.einsum("bd,bgd->bg", query_emb.float(), doc_emb.float()) / self.temperature
            teacher = teacher_scores.to(student.device, torch.float32) / self.teacher_temperature
            kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                          reduction="batchmean")
        return loss + self.weight * kl


class MatryoshkaLoss(nn.Module):
    """Weighted sum of `base_loss` on embeddings truncated to each of `dims` and re-normalised,
    so that the first d coordinates of an embedding work on their own (Kusupati et al. 2022)."""

    def __init__(self, base_loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None):
        super().__init__()
        dims = list(dims)
        if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"MatryoshkaLoss: dims must be distinct positive integers, got {dims}")
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if len(weights) != len(dims):
            raise ValueError(f"MatryoshkaLoss: {len(weights)} weights for {len(dims)} dims")
        self.base_loss, self.dims, self.weights = base_loss, dims, weights

    def forward(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor,
                query_pos_keys: torch.Tensor, **extra) -> torch.Tensor:
        if max(self.dims) > query_emb.shape[-1]:
            raise ValueError(f"MatryoshkaLoss: dim {max(self.dims)} exceeds the embedding size {query_emb.shape[-1]}")
        total = 0.0
        for dim, weight in zip(self.dims, self.weights):
            total = total + weight * self.base_loss(_truncate(query_emb, dim), _truncate(doc_emb, dim),
                                                    doc_keys, query_pos_keys, **extra)
        return total


def _truncate(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., D] -> [..., dim], unit length again (truncation shortens the vector)."""
    return F.normalize(emb[..., :dim].float(), dim=-1)


class GradCache:
    """The loss of a large batch in the memory of one chunk (Gao et al. 2021): in-batch negatives
    scale with the batch, which gradient accumulation cannot give.

    1. Encode every chunk without a graph, recording each chunk's RNG state.
    2. Compute the loss (with its cross-process gather) on the cached embeddings, and its
       gradient with respect to each embedding.
    3. Re-encode each chunk with a graph, replaying its RNG state so dropout draws the same masks,
       and backpropagate the surrogate <embedding, gradient>, whose parameter gradient is exactly
       the loss's.
    The cost over the plain loss is step 1: one extra forward without activations kept.

    Every rank must run the same number of forwards and backwards (ZeRO-3 gathers parameters in
    each: a rank that stops early deadlocks the others, FIELD.md). The chunk counts
    are therefore maxed over ranks with one all_reduce, and a rank short of chunks runs 1-row
    dummy chunks whose gradient is zero. Uneven local batches are thus fine for GradCache itself;
    an in-batch loss that gathers across processes still needs equal ones.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"GradCache: chunk_size must be >= 1, got {chunk_size}")
        self.loss_fn, self.chunk_size = loss_fn, chunk_size

    def __call__(self, encode: Callable[[Features], torch.Tensor], query_features: Features,
                 doc_features: Features, doc_keys: torch.Tensor, query_pos_keys: torch.Tensor, *,
                 backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
                 no_sync: Callable[[], contextlib.AbstractContextManager] | None = None, **extra) -> torch.Tensor:
        """Accumulate the loss's parameter gradients into `.grad` and return the loss (detached).

        encode: features of b rows -> [b, D] embeddings (the DDP-wrapped model, for DDP hooks).
        It gets a copy of each chunk's dict: sentence-transformers modules write their outputs
        into it, which would keep every chunk's token embeddings alive.
        query_features: B rows; doc_features: B*G rows, query-major (row b*G + g is doc_emb[b, g]);
        both on the model's device. backward: `accelerator.backward` for fp16 loss scaling.
        no_sync: e.g. `lambda: accelerator.no_sync(model)`; every chunk but the last re-encodes
        and backpropagates inside it, so DDP all-reduces gradients once.
        extra: passed to the loss as is (e.g. teacher_scores).
        """
        if doc_keys.dim() != 2:
            raise ValueError(f"doc_keys must be [B, G], got {tuple(doc_keys.shape)}")
        batch, group = doc_keys.shape
        _check_rows(query_features, "query_features", batch)
        _check_rows(doc_features, "doc_features", batch * group)
        size = self.chunk_size
        real_counts = [-(-batch // size), -(-batch * group // size)]     # ceil: this rank's chunks
        device = next(iter(query_features.values())).device
        query_count, doc_count = _max_over_ranks(real_counts, device)
        query_chunks = _chunks(query_features, size, query_count)
        doc_chunks = _chunks(doc_features, size, doc_count)

        # 1. Embeddings without a graph; the RNG state before each chunk's forward.
        query_cache, query_rng = _encode_without_graph(encode, query_chunks, real_counts[0])  # [B, D]
        doc_cache, doc_rng = _encode_without_graph(encode, doc_chunks, real_counts[1])        # [B*G, D]

        # 2. The loss on the cached embeddings, and its gradient per embedding (fp32 leaves).
        query_cache.requires_grad_(True)
        doc_cache.requires_grad_(True)
        loss = self.loss_fn(query_cache, doc_cache.view(batch, group, -1), doc_keys, query_pos_keys, **extra)
        query_grad, doc_grad = torch.autograd.grad(loss, [query_cache, doc_cache])

        # 3. Re-encode each chunk with its RNG replayed; backprop <embedding, gradient>.
        jobs = list(zip(query_chunks, query_rng, _chunk_grads(query_grad, size, query_count))) \
            + list(zip(doc_chunks, doc_rng, _chunk_grads(doc_grad, size, doc_count)))
        for i, (chunk, rng, grad) in enumerate(jobs):
            is_last = i == len(jobs) - 1
            with contextlib.nullcontext() if is_last or no_sync is None else no_sync():
                with rng.replay():
                    emb = encode(dict(chunk))                                    # [b, D]
                backward(torch.dot(emb.float().flatten(), grad.flatten()))
        return loss.detach()


def _check_rows(features: Features, name: str, expected: int) -> None:
    """Every tensor of a batch-major feature dict must have `expected` rows."""
    rows = {value.shape[0] for value in features.values()}
    if rows != {expected}:
        raise ValueError(f"GradCache: every tensor of {name} must have {expected} rows, got {sorted(rows)}")


def _max_over_ranks(counts: list[int], device: torch.device) -> list[int]:
    """Chunk counts raised to the largest on any rank (one all_reduce; none without a process group)."""
    _, world = rank_and_world_size()
    if world == 1:
        return counts
    counts_tensor = torch.tensor(counts, device=device)
    dist.all_reduce(counts_tensor, op=dist.ReduceOp.MAX)
    return counts_tensor.tolist()


def _chunks(features: Features, chunk_size: int, count: int) -> list[Features]:
    """`count` chunks: consecutive row slices of at most `chunk_size` rows, then, once the rows run
    out, 1-row dummies (the first row again) that keep this rank's forward count equal to the others'."""
    rows = next(iter(features.values())).shape[0]
    real = [{k: v[s:s + chunk_size] for k, v in features.items()} for s in range(0, rows, chunk_size)]
    dummy = {k: v[:1] for k, v in features.items()}
    return real + [dummy] * (count - len(real))


def _chunk_grads(grad: torch.Tensor, chunk_size: int, count: int) -> list[torch.Tensor]:
    """The embedding gradient split like `_chunks`; zeros for the dummies, which must not learn."""
    pieces = list(grad.split(chunk_size))
    return pieces + [grad.new_zeros(1, grad.shape[1])] * (count - len(pieces))


def _encode_without_graph(encode: Callable[[Features], torch.Tensor], chunks: list[Features],
                          real_count: int) -> tuple[torch.Tensor, list[_RngState]]:
    """fp32 embeddings of the first `real_count` chunks, concatenated; the RNG state before every chunk."""
    embeddings, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            rows = next(iter(chunk.values()))
            states.append(_RngState(rows.device))
            emb = encode(dict(chunk))
            if emb.dim() != 2 or emb.shape[0] != rows.shape[0]:
                raise ValueError(f"GradCache: encode must return [{rows.shape[0]}, D], got {tuple(emb.shape)}")
            embeddings.append(emb)
    return torch.cat(embeddings[:real_count]).float(), states


class _RngState:
    """The CPU and accelerator RNG state at one moment, to replay it later: the idea of
    torch.utils.checkpoint and sentence-transformers' RandContext. Replaying inside `fork_rng`
    leaves the global RNG where it was."""

    def __init__(self, device: torch.device):
        self.cpu_state = torch.get_rng_state()
        self.device = None if device.type == "cpu" else device
        self.device_state = None if self.device is None else torch.get_device_module(device).get_rng_state(device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [] if self.device is None else [self.device]
        device_type = None if self.device is None else self.device.type
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu_state)
            if self.device is not None:
                torch.get_device_module(self.device).set_rng_state(self.device_state, self.device)
            yield
