"""InfoNCE and Matryoshka against plain-Python references, in one process."""
import math

import pytest
import torch
import torch.nn.functional as F

from embed.training.loss import InfoNCELoss, ListwiseDistillation, MatryoshkaLoss


def reference_infonce(query_emb, doc_emb, doc_keys, query_pos_keys, temperature, in_batch_negatives):
    """The loss as the definition reads, one query and one candidate at a time, in float64."""
    q, d = query_emb.double().tolist(), doc_emb.double().tolist()
    batch, group = len(d), len(d[0])
    total = 0.0
    for i in range(batch):
        positives = {int(doc_keys[i, 0])} | {int(k) for k in query_pos_keys[i] if k >= 0}
        candidates = [(b, g) for b in range(batch) for g in range(group)] if in_batch_negatives \
            else [(i, g) for g in range(group)]
        scores = []
        for b, g in candidates:
            if (b, g) != (i, 0) and int(doc_keys[b, g]) in positives:
                continue  # duplicates a positive: would be a false negative
            scores.append(sum(x * y for x, y in zip(q[i], d[b][g])) / temperature)
        positive = sum(x * y for x, y in zip(q[i], d[i][0])) / temperature
        top = max(scores)
        total += top + math.log(sum(math.exp(s - top) for s in scores)) - positive
    return total / batch


def make_batch(batch=4, group=3, dim=8, seed=0):
    """Random unit embeddings; keys with a cross-query duplicate of query 0's positive, a hard
    negative of query 1 equal to its positive, and a second listed positive of query 2."""
    gen = torch.Generator().manual_seed(seed)
    query_emb = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    doc_emb = F.normalize(torch.randn(batch, group, dim, generator=gen), dim=-1)
    doc_keys = torch.arange(batch * group).view(batch, group)
    doc_keys[3, 1] = doc_keys[0, 0]            # query 3's negative is query 0's positive text
    doc_keys[1, 2] = doc_keys[1, 0]            # query 1's own negative repeats its positive
    query_pos_keys = torch.full((batch, 2), -1)
    query_pos_keys[2] = torch.tensor([doc_keys[2, 0], doc_keys[0, 1]])  # query 2: 2nd positive = (0,1)
    return query_emb, doc_emb, doc_keys, query_pos_keys


@pytest.mark.parametrize("in_batch_negatives", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_infonce_matches_reference(in_batch_negatives, temperature):
    batch = make_batch()
    loss = InfoNCELoss(temperature, in_batch_negatives=in_batch_negatives)(*batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_infonce(*batch, temperature, in_batch_negatives), abs=1e-5)


def test_duplicate_masking_changes_the_loss():
    """Masking is real: the same embeddings with all-distinct keys give a different loss."""
    query_emb, doc_emb, doc_keys, query_pos_keys = make_batch()
    distinct = torch.arange(doc_keys.numel()).view_as(doc_keys)
    no_extra = torch.full_like(query_pos_keys, -1)
    masked = InfoNCELoss()(query_emb, doc_emb, doc_keys, query_pos_keys)
    unmasked = InfoNCELoss()(query_emb, doc_emb, distinct, no_extra)
    assert unmasked.item() == pytest.approx(reference_infonce(query_emb, doc_emb, distinct, no_extra, 0.05, True), abs=1e-5)
    assert abs(masked.item() - unmasked.item()) > 1e-3


def test_in_batch_negatives_only_add_candidates():
    query_emb, doc_emb, doc_keys, query_pos_keys = make_batch()
    with_batch = InfoNCELoss(in_batch_negatives=True)(query_emb, doc_emb, doc_keys, query_pos_keys)
    own_only = InfoNCELoss(in_batch_negatives=False)(query_emb, doc_emb, doc_keys, query_pos_keys)
    assert with_batch.item() > own_only.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_loss(dtype):
    query_emb, doc_emb, doc_keys, query_pos_keys = make_batch()
    query_low = query_emb.to(dtype).requires_grad_()
    loss = InfoNCELoss()(query_low, doc_emb.to(dtype), doc_keys, query_pos_keys)
    assert loss.dtype == torch.float32
    expected = reference_infonce(query_low.detach().float(), doc_emb.to(dtype).float(), doc_keys,
                                 query_pos_keys, 0.05, True)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert query_low.grad.dtype == dtype and torch.isfinite(query_low.grad).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_logits_stay_fp32_under_autocast(device):
    """Inside a bf16 autocast region (as a mixed-precision training step runs) the similarity
    matmul must not drop to bf16: at temperature 0.05 that would move the loss by ~1e-2."""
    batch = tuple(t.to(device) for t in make_batch(batch=8, group=4, dim=64))
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = InfoNCELoss()(*batch)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_infonce(*(t.cpu() for t in batch), 0.05, True), abs=1e-5)


def test_gradients_reach_queries_and_documents():
    query_emb, doc_emb, doc_keys, query_pos_keys = make_batch()
    query_emb.requires_grad_()
    doc_emb.requires_grad_()
    InfoNCELoss()(query_emb, doc_emb, doc_keys, query_pos_keys).backward()
    assert torch.isfinite(query_emb.grad).all() and torch.isfinite(doc_emb.grad).all()
    assert query_emb.grad.abs().sum(-1).gt(0).all()
    assert doc_emb.grad.abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda q, d, k, p: (q[0], d, k, p), "query_emb must be a float"),
    (lambda q, d, k, p: (q, d[:, :, :4], k, p), "doc_emb must be a float"),
    (lambda q, d, k, p: (q, d[:3], k, p), "doc_emb must be a float"),
    (lambda q, d, k, p: (q, d, k[:, :2], p), "doc_keys must be int64"),
    (lambda q, d, k, p: (q, d, k.int(), p), "doc_keys must be int64"),
    (lambda q, d, k, p: (q, d, k, p[:2]), "query_pos_keys must be int64"),
    (lambda q, d, k, p: (q, d, k - 1, p), "doc_keys must be >= 0"),
    (lambda q, d, k, p: (q.long(), d, k, p), "query_emb must be a float"),
])
def test_bad_inputs_raise_clear_errors(mutate, message):
    with pytest.raises(ValueError, match=message):
        InfoNCELoss()(*mutate(*make_batch()))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)
    with pytest.raises(ValueError, match="distinct positive"):
        MatryoshkaLoss(InfoNCELoss(), dims=[4, 4])
    with pytest.raises(ValueError, match="2 weights for 1 dims"):
        MatryoshkaLoss(InfoNCELoss(), dims=[4], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="exceeds the embedding size"):
        MatryoshkaLoss(InfoNCELoss(), dims=[16])(*make_batch(dim=8))


def test_matryoshka_is_the_weighted_sum_over_truncations():
    query_emb, doc_emb, doc_keys, query_pos_keys = make_batch(dim=8)
    loss = MatryoshkaLoss(InfoNCELoss(0.1), dims=[8, 4, 2], weights=[1.0, 0.5, 0.25])(
        query_emb, doc_emb, doc_keys, query_pos_keys)
    by_hand = 0.0
    for dim, weight in [(8, 1.0), (4, 0.5), (2, 0.25)]:
        q = F.normalize(query_emb[:, :dim], dim=-1)
        d = F.normalize(doc_emb[..., :dim], dim=-1)
        by_hand += weight * reference_infonce(q, d, doc_keys, query_pos_keys, 0.1, True)
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)



# ---------------------------------------------------------------- distillation from mining's teacher scores
def reference_listwise_kl(query_emb, doc_emb, teacher_scores, temperature, teacher_temperature):
    """KL(teacher || student) per query over its own documents, averaged, in float64."""
    total = 0.0
    for i in range(doc_emb.shape[0]):
        student = [float(query_emb[i].double() @ d.double()) / temperature for d in doc_emb[i]]
        teacher = [float(t) / teacher_temperature for t in teacher_scores[i]]
        log_zs = max(student) + math.log(sum(math.exp(s - max(student)) for s in student))
        log_zt = max(teacher) + math.log(sum(math.exp(t - max(teacher)) for t in teacher))
        total += sum(math.exp(t - log_zt) * ((t - log_zt) - (s - log_zs)) for s, t in zip(student, teacher))
    return total / doc_emb.shape[0]


def test_distillation_adds_the_weighted_listwise_kl():
    batch = make_batch()
    teacher = torch.rand(batch[1].shape[:2], generator=torch.Generator().manual_seed(1))
    base = InfoNCELoss(0.05)(*batch)
    loss = ListwiseDistillation(InfoNCELoss(0.05), weight=0.5, temperature=0.05, teacher_temperature=0.1)(
        *batch, teacher_scores=teacher)
    expected = base.item() + 0.5 * reference_listwise_kl(batch[0], batch[1], teacher, 0.05, 0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() > base.item()


def test_distillation_is_zero_when_the_student_agrees_and_pulls_towards_the_teacher():
    query_emb, doc_emb, doc_keys, pos_keys = make_batch()
    student_scores = torch.einsum("bd,bgd->bg", query_emb, doc_emb)
    distil = ListwiseDistillation(InfoNCELoss(0.05), weight=1.0, temperature=0.05, teacher_temperature=0.05)
    agreeing = distil(query_emb, doc_emb, doc_keys, pos_keys, teacher_scores=student_scores)
    assert agreeing.item() == pytest.approx(InfoNCELoss(0.05)(query_emb, doc_emb, doc_keys, pos_keys).item(), abs=1e-5)
    # a teacher preferring document 2 of query 0: a gradient step on the KL alone raises its score
    teacher = student_scores.clone()
    teacher[0, 2] += 1.0
    docs = doc_emb.clone().requires_grad_(True)
    only_kl = ListwiseDistillation(lambda *a: torch.zeros(()), weight=1.0, temperature=0.05, teacher_temperature=0.05)
    only_kl(query_emb, docs, doc_keys, pos_keys, teacher_scores=teacher).backward()
    moved = docs - 0.01 * docs.grad
    assert float(query_emb[0] @ moved[0, 2]) > float(query_emb[0] @ doc_emb[0, 2])


def test_distillation_needs_aligned_teacher_scores():
    batch = make_batch()
    distil = ListwiseDistillation(InfoNCELoss(0.05), weight=1.0, temperature=0.05, teacher_temperature=0.05)
    with pytest.raises(ValueError, match=r"teacher_scores must be \[B, G\]=\(4, 3\)"):
        distil(*batch)
    with pytest.raises(ValueError, match="teacher_scores must be"):
        distil(*batch, teacher_scores=torch.zeros(4, 2))
    off = ListwiseDistillation(InfoNCELoss(0.05), weight=0.0, temperature=0.05, teacher_temperature=0.05)
    assert off(*batch).item() == pytest.approx(InfoNCELoss(0.05)(*batch).item())
