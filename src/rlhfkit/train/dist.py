"""Distributed set-up read from the environment ``torchrun`` provides (RANK, WORLD_SIZE, ...).

One process runs unchanged. Under torchrun each rank computes gradients of its share of the
batch with the loss already divided by the *global* denominator, so summing gradients over
ranks (one all-reduce per step) gives exactly the one-process update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(model: torch.nn.Module, info: DistInfo) -> None:
    """Sum every gradient over ranks in one flat buffer (one collective per step)."""
    if not info.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n


def broadcast_params(model: torch.nn.Module, info: DistInfo) -> None:
    """Start every rank from rank 0's weights."""
    if info.enabled:
        for p in model.state_dict().values():
            dist.broadcast(p, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
