"""GradCache gives the plain loss's value and parameter gradients, with dropout on, in 1 and 2 processes."""
import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_loss_distributed import run_processes
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertModel

from embed.training.loss import (
    GradCache,
    InfoNCELoss,
    ListwiseDistillation,
    MatryoshkaLoss,
)

GROUP, SEED = 3, 1234


@pytest.fixture(autouse=True)
def one_thread():
    """A 32-wide BERT gains nothing from threads, and on a shared 2-core machine OpenMP threads
    spinning against other processes make each step 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MeanPoolBert(nn.Module):
    """A tiny random BERT with mean pooling and unit-length output; dropout 0.1 (on in train mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32,
                            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [b, T, H]
        mask = attention_mask.unsqueeze(-1).float()                                             # [b, T, 1]
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)                       # [b, H]


def features(rows, length, gen):
    """Random token ids, right-padded to random lengths."""
    lengths = torch.randint(2, length + 1, (rows,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": torch.randint(1, 64, (rows, length), generator=gen) * mask, "attention_mask": mask}


def make_batch(batch, seed=0, first_key=0):
    """Query and doc features (docs flattened query-major to B*G rows) and keys with a duplicate."""
    gen = torch.Generator().manual_seed(seed)
    doc_keys = first_key + torch.arange(batch * GROUP).view(batch, GROUP)
    doc_keys[-1, 1] = doc_keys[0, 0]
    return features(batch, 7, gen), features(batch * GROUP, 11, gen), doc_keys, torch.full((batch, 1), -1)


def concat_batches(first, second):
    return tuple({k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])
                 for a, b in zip(first, second))


def rows(feats, start, stop):
    return {k: v[start:stop] for k, v in feats.items()}


def plain_step(model, loss_fn, query_feats, doc_feats, doc_keys, query_pos_keys, chunk_size, **extra):
    """The plain loss with the graph kept, the forwards split like GradCache's so dropout draws
    the same masks from the same seed; returns the loss and accumulates gradients."""
    torch.manual_seed(SEED)
    query_emb = torch.cat([model(**rows(query_feats, s, s + chunk_size))
                           for s in range(0, len(doc_keys), chunk_size)])
    doc_emb = torch.cat([model(**rows(doc_feats, s, s + chunk_size))
                         for s in range(0, doc_keys.numel(), chunk_size)])
    loss = loss_fn(query_emb, doc_emb.view(*doc_keys.shape, -1), doc_keys, query_pos_keys, **extra)
    loss.backward()
    return loss.detach()


def gradcache_step(model, loss_fn, batch, chunk_size, **kwargs):
    torch.manual_seed(SEED)
    return GradCache(loss_fn, chunk_size)(lambda f: model(**f), *batch, **kwargs)


def grads(model):
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def assert_grads_close(actual, expected, atol=1e-5):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)


LOSSES = {
    "in_batch": lambda: InfoNCELoss(0.05),
    "own_group_only": lambda: InfoNCELoss(0.05, in_batch_negatives=False),
    "matryoshka": lambda: MatryoshkaLoss(InfoNCELoss(0.05), [32, 8], [1.0, 0.5]),
}


def to_device(batch, device):
    return tuple({k: v.to(device) for k, v in t.items()} if isinstance(t, dict) else t.to(device) for t in batch)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


# 5 queries and 15 docs: chunks of 2 and 4 leave a ragged last chunk; 100 is one chunk (no chunking).
# On CUDA the replay must restore the GPU generator that dropout draws from.
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("loss_name, chunk_size", [
    ("in_batch", 2), ("in_batch", 100), ("own_group_only", 4), ("matryoshka", 4)])
def test_gradcache_equals_plain_loss_with_dropout(loss_name, chunk_size, device):
    model, batch = MeanPoolBert().train().to(device), to_device(make_batch(5), device)
    plain_loss = plain_step(model, LOSSES[loss_name](), *batch, chunk_size)
    plain_grads = grads(model)
    cached_loss = gradcache_step(model, LOSSES[loss_name](), batch, chunk_size)
    assert not cached_loss.requires_grad
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-5)
    assert_grads_close(grads(model), plain_grads)


def test_gradcache_passes_teacher_scores_to_a_distilling_matryoshka_loss():
    """The distillation term reaches the loss through GradCache (and through Matryoshka's wrapper)."""
    def loss_fn():
        return MatryoshkaLoss(ListwiseDistillation(InfoNCELoss(0.05), 1.0, 0.05, 0.1), [32, 8])

    model, batch = MeanPoolBert().train(), make_batch(5)
    teacher = torch.rand(5, GROUP, generator=torch.Generator().manual_seed(3))
    plain_loss = plain_step(model, loss_fn(), *batch, 4, teacher_scores=teacher)
    plain_grads = grads(model)
    cached_loss = gradcache_step(model, loss_fn(), batch, 4, teacher_scores=teacher)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-5)
    assert_grads_close(grads(model), plain_grads)
    without = plain_step(model, MatryoshkaLoss(InfoNCELoss(0.05), [32, 8]), *batch, 4)
    assert plain_loss.item() > without.item() + 1e-4  # the KL term is really there


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_dropout_is_active_so_the_replay_matters(device):
    """Control: another seed gives other dropout masks and visibly other gradients."""
    model, batch = MeanPoolBert().train().to(device), to_device(make_batch(5), device)
    plain_step(model, InfoNCELoss(), *batch, 2)
    reference = grads(model)
    torch.manual_seed(SEED + 1)
    GradCache(InfoNCELoss(), 2)(lambda f: model(**f), *batch)
    assert max((g - r).abs().max() for g, r in zip(grads(model), reference)) > 1e-4


def test_backward_and_no_sync_hooks():
    """The given backward runs once per chunk; every chunk but the last runs inside no_sync."""
    model, batch = MeanPoolBert().train(), make_batch(5)
    calls = []

    def backward(surrogate):
        calls.append("backward")
        surrogate.backward()

    @contextlib.contextmanager
    def no_sync():
        calls.append("no_sync")
        yield

    gradcache_step(model, InfoNCELoss(), batch, 4, backward=backward, no_sync=no_sync)
    chunks = 2 + 4                               # ceil(5/4) query chunks + ceil(15/4) doc chunks
    assert calls == ["no_sync", "backward"] * (chunks - 1) + ["backward"]


def test_bad_arguments_raise():
    model, (query_feats, doc_feats, doc_keys, pos_keys) = MeanPoolBert(), make_batch(3)
    encode = lambda f: model(**f)  # noqa: E731
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(InfoNCELoss(), 0)
    with pytest.raises(ValueError, match="doc_features must have 9 rows"):
        GradCache(InfoNCELoss(), 2)(encode, query_feats, rows(doc_feats, 0, 8), doc_keys, pos_keys)
    with pytest.raises(ValueError, match="query_features must have 3 rows"):
        GradCache(InfoNCELoss(), 2)(encode, rows(query_feats, 0, 2), doc_feats, doc_keys, pos_keys)
    with pytest.raises(ValueError, match=r"encode must return \[2, D\]"):
        GradCache(InfoNCELoss(), 2)(lambda f: model(**f)[0], query_feats, doc_feats, doc_keys, pos_keys)


# ---- two processes ----------------------------------------------------------------------------

def _two_process_checks(rank, world):
    parts = [make_batch(3, seed=10 + r, first_key=100 * r) for r in range(world)]
    # 1. Dropout on, in-batch negatives gathered across ranks: GradCache == plain loss, both in DDP.
    model = DistributedDataParallel(MeanPoolBert().train())
    plain_loss = plain_step(model, InfoNCELoss(), *parts[rank], 2)
    plain_grads = grads(model)
    cached_loss = gradcache_step(model, InfoNCELoss(), parts[rank], 2, no_sync=model.no_sync)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-5)
    assert_grads_close(grads(model), plain_grads)

    # 2. Dropout off: GradCache in 2 processes == plain loss in 1 process on the joined batch.
    model.eval()
    cached_loss = gradcache_step(model, InfoNCELoss(), parts[rank], 2, no_sync=model.no_sync)
    dist.all_reduce(cached_loss)                  # each rank returns its own queries' mean
    distributed_grads = grads(model)
    single = MeanPoolBert().eval()
    single_loss = plain_step(single, InfoNCELoss(gather_across_processes=False), *concat_batches(*parts), 100)
    torch.testing.assert_close(cached_loss / world, single_loss, rtol=0, atol=1e-5)
    assert_grads_close(distributed_grads, grads(single))

    # 3. Uneven local batches (2 vs 4 queries, no gather): the short rank pads with dummy chunks.
    #    Still dropout off: a dummy forward draws random numbers that the plain step does not.
    #    The plain reference runs outside DDP (its forward counts differ between ranks, which
    #    hangs DDP) and averages gradients by hand, as DDP does.
    batch = make_batch(2 + 2 * rank, seed=20 + rank)
    plain_step(model.module, InfoNCELoss(in_batch_negatives=False), *batch, 3)
    plain_grads = grads(model)
    for grad in plain_grads:
        dist.all_reduce(grad)
        grad /= world
    backward_calls = torch.zeros(1, dtype=torch.long)

    def counting_backward(surrogate):
        backward_calls.add_(1)
        surrogate.backward()

    gradcache_step(model, InfoNCELoss(in_batch_negatives=False), batch, 3,
                   backward=counting_backward, no_sync=model.no_sync)
    assert_grads_close(grads(model), plain_grads)
    assert backward_calls.item() == 2 + 4         # rank 1: ceil(4/3) + ceil(12/3) chunks, on both ranks


@pytest.mark.slow
def test_gradcache_in_two_processes():
    run_processes(_two_process_checks)
