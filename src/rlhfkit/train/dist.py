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

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's models and batches live ("cpu", "cuda:0", ...)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> str:
    """``auto``: CUDA when PyTorch sees a GPU, else the CPU. Under torchrun each rank takes its
    ``LOCAL_RANK``'s GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from .config import ConfigError

            raise ConfigError("train.device=cuda but PyTorch sees no GPU (use train.device=auto or cpu)")
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def init_distributed(device: str = "cpu") -> DistInfo:
    """This process's rank and device; the process group (NCCL on GPUs, gloo on CPUs) under torchrun."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=where)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker
        die_with_launcher()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if where.startswith("cuda") else "gloo")
    if dist.get_rank() != 0:  # transformers' loading bars and reports once, from rank 0, as rlhfkit's own lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, where)


def die_with_launcher() -> None:
    """Have the kernel kill this process when its parent (torchrun's agent) dies (Linux's
    PR_SET_PDEATHSIG): a launcher killed outright left its workers training on, writing the same
    out_dir as a run resumed there. Checkpoints are renamed into place whole, so a kill mid-save
    leaves the last complete one."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks in place (NCCL reduces device tensors: a CPU tensor makes the round trip)."""
    if info.enabled:
        if info.device != "cpu" and tensor.device.type == "cpu":
            moved = tensor.to(info.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_varying(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's 1-D ``values`` (of lengths that may differ), concatenated in rank order, where
    they are (NCCL gathers device tensors; gloo CPU ones): each padded to the longest, then cut."""
    if not info.enabled:
        return values
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device))
    lengths = [int(s) for s in sizes]
    padded = torch.nn.functional.pad(values, (0, max(lengths) - values.numel()))
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce, so also a barrier)."""
    if not info.enabled:
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), info).item() > 0


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


def broadcast_object(value, info: DistInfo):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value, info: DistInfo) -> list:
    """Every rank's ``value`` (any picklable object), in rank order."""
    if not info.enabled:
        return [value]
    out = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
