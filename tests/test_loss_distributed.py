"""Two gloo processes under DDP give the loss and gradients of one process on the joined batch."""
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from embed.training.loss import InfoNCELoss, MatryoshkaLoss

WORLD, LOCAL_BATCH, GROUP, IN_DIM, DIM = 2, 3, 3, 6, 8


def run_processes(worker, world=WORLD, timeout=180):
    """Run worker(rank, world) in `world` spawned CPU processes joined in a gloo group; a failure
    in any of them fails the test with its traceback, a hang fails it after `timeout` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_init_and_run, args=(worker, world, port), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {timeout}s (deadlock?)")


def _init_and_run(rank, worker, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        worker(rank, world)
    finally:
        dist.destroy_process_group()


def joined_batch(world):
    """The global batch (same on every rank): inputs, and keys with duplicates across ranks."""
    gen = torch.Generator().manual_seed(1)
    batch = world * LOCAL_BATCH
    query_x = torch.randn(batch, IN_DIM, generator=gen)
    doc_x = torch.randn(batch, GROUP, IN_DIM, generator=gen)
    doc_keys = torch.arange(batch * GROUP).view(batch, GROUP)
    doc_keys[4, 2] = doc_keys[0, 0]          # rank 1's negative is rank 0's positive text
    doc_keys[1, 1] = doc_keys[5, 0]          # rank 0's negative is rank 1's positive text
    query_pos_keys = torch.full((batch, 1), -1)
    query_pos_keys[2, 0] = doc_keys[3, 1]    # query 2 (rank 0) has a second positive on rank 1
    return query_x, doc_x, doc_keys, query_pos_keys


def loss_and_grads(encoder, loss_fn, query_x, doc_x, doc_keys, query_pos_keys):
    """Loss value and parameter gradients of a linear encoder with unit-length outputs."""
    encoder.zero_grad()
    query_emb = F.normalize(encoder(query_x), dim=-1)                       # [B, D]
    doc_emb = F.normalize(encoder(doc_x.flatten(0, 1)), dim=-1).view(*doc_x.shape[:2], -1)  # [B, G, D]
    loss = loss_fn(query_emb, doc_emb, doc_keys, query_pos_keys)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in encoder.parameters()]


LOSSES = {
    "in_batch": lambda gather: InfoNCELoss(0.05, in_batch_negatives=True, gather_across_processes=gather),
    "own_group_only": lambda gather: InfoNCELoss(0.05, in_batch_negatives=False, gather_across_processes=gather),
    "matryoshka": lambda gather: MatryoshkaLoss(InfoNCELoss(0.05, gather_across_processes=gather), [DIM, 4], [1.0, 0.5]),
}


def _compare_with_joined_batch(rank, world):
    batch = joined_batch(world)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for name, make_loss in LOSSES.items():
        torch.manual_seed(0)
        encoder = nn.Linear(IN_DIM, DIM)
        ref_loss, ref_grads = loss_and_grads(encoder, make_loss(False), *batch)

        ddp = DistributedDataParallel(encoder)
        loss, grads = loss_and_grads(ddp, make_loss(True), *(t[local] for t in batch))
        dist.all_reduce(loss)                # each rank returns its own queries' mean
        torch.testing.assert_close(loss / world, ref_loss, rtol=0, atol=1e-5, msg=name)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, rtol=0, atol=1e-5, msg=name)

        if name != "own_group_only":         # control: without the gather the gradients differ
            _, local_only = loss_and_grads(ddp, make_loss(False), *(t[local] for t in batch))
            assert max((g - r).abs().max() for g, r in zip(local_only, ref_grads)) > 1e-3, name


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_joined_batch():
    run_processes(_compare_with_joined_batch)
