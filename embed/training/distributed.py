"""The two collectives the contrastive loss needs, usable with or without a process group.

Why not `accelerate.gather`: it is not differentiable, so documents gathered from other ranks
would act as constants and this rank's encoder would never learn from being another rank's
negative. Here the gather keeps the autograd graph: its backward sums, over all ranks, the
gradient that each rank's loss puts on this rank's rows (a reduce-scatter).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

# torch marks this differentiable gather deprecated in favour of the private
# `_functional_collectives`; it is still the one sentence-transformers relies on across NCCL
# and gloo, so we keep it and silence only its own deprecation notice.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
)


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order, keeping gradients.

    [n, ...] on each rank -> [world * n, ...]; identity with world size 1.
    Every rank must pass the same shape and dtype: a collective cannot gather ragged tensors,
    and on NCCL a mismatch hangs or corrupts instead of raising. So batches must be equal-sized
    on every rank (drop or pad the last incomplete batch).
    """
    _, world = rank_and_world_size()
    if world == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)
