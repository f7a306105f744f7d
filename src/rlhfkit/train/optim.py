"""AdamW, a warm-up + decay schedule, and the optimizer step every method calls."""

from __future__ import annotations

import math

import torch

from ..models.forward import reshard
from .dist import DistInfo, all_reduce_grads


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite; raised before the optimizer step."""


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                    lr_by_child: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW; ``lr_by_child`` gives named children (a ModuleDict's actor and critic) their own lr.
    A sharded model's parameters are its shards first (``reshard``: an eval forward before training
    leaves FSDP2's root gathered, and the optimizer would hold tensors the model then drops)."""
    reshard(model)
    parts = [(getattr(model, name), child_lr) for name, child_lr in lr_by_child.items()] if lr_by_child else [(model, lr)]
    groups = []
    for module, group_lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        # Decay only matrices, never norms or biases (the usual practice for transformers). A group
        # with nothing in it is left out: torch.distributed.checkpoint loads at most one (PPO's LoRA
        # actor and critic, all matrices, made two, and a sharded run could not resume)
        for kept, decay in ([p for p in params if p.ndim >= 2], weight_decay), ([p for p in params if p.ndim < 2], 0.0):
            if kept:
                groups.append({"params": kept, "weight_decay": decay, "lr": group_lr})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def matching_groups(saved: dict, optimizer) -> dict:
    """A saved optimizer state dict as ``optimizer`` (``build_optimizer``'s) holds its groups: one
    written before empty groups were left out has them dropped (they hold no state)."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        saved = {**saved, "param_groups": [g for g in saved["param_groups"] if g["params"]]}
    return saved


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then the schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")


def build_scheduler(optimizer, total: int, warmup: int, schedule: str, min_ratio: float = 0.0):
    if schedule not in ("cosine", "linear", "constant"):  # validate the name now, not when warm-up ends
        raise ValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, schedule, min_ratio))


def hyperparameters(optimizer) -> list[tuple[float, float]]:
    """Each param group's (base lr, weight_decay) as the config built them, before a checkpoint
    loads (a scheduler already attached keeps the base lr as ``initial_lr``)."""
    return [(group.get("initial_lr", group["lr"]), group["weight_decay"]) for group in optimizer.param_groups]


def rebase_schedule(optimizer, scheduler, built: list[tuple[float, float]]) -> None:
    """After a checkpoint's optimizer and scheduler states load: the config's base lrs and weight
    decays (``hyperparameters`` of the freshly built optimizer), and the lr of the step the run
    resumes at under the config's schedule, which a changed length, schedule or warm-up moves.
    The state dicts restore the saved run's lrs, and a new schedule would otherwise take effect
    only from the second resumed step. Unchanged, every value is the one the checkpoint holds,
    computed as LambdaLR computes it."""
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, (lr, decay), factor in zip(optimizer.param_groups, built, factors):
        group["initial_lr"], group["weight_decay"], group["lr"] = lr, decay, lr * factor
    scheduler.base_lrs = [lr for lr, _ in built]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


DOT_NORM = True  # False: torch's get_total_norm (benchmarks/inprocess.py measures the two)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, sqrt(sum_i g_i . g_i), as ``get_total_norm`` gives it.

    Each float32/float64 gradient's square sum is one BLAS dot product: on the CPU, where
    ``get_total_norm`` runs ``linalg.vector_norm`` per tensor, that reads a gradient out of memory
    about 2.5x faster (4 MB: 154 against 386 us on 2 threads), the same sum to float32 rounding;
    infinite or NaN where it is (a non-finite gradient, squares past float32's range)."""
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    squares = []
    for g in grads:
        if g.dtype in (torch.float32, torch.float64) and g.layout == torch.strided:
            flat = g.reshape(-1)
            squares.append(torch.dot(flat, flat).to(dtype))
        else:
            squares.append(torch.linalg.vector_norm(g, dtype=dtype).square())
    if not squares:
        return torch.zeros((), dtype=dtype)
    return torch.stack(squares).sum().sqrt()


def _grad_norm(grads: list[torch.Tensor], sharded: bool) -> torch.Tensor:
    """``total_norm`` for plain CPU gradients; elsewhere ``get_total_norm`` (its foreach kernels are
    fused on an accelerator, and it takes FSDP2's DTensors)."""
    if DOT_NORM and not sharded and all(g.device.type == "cpu" for g in grads):
        return total_norm(grads)
    return torch.nn.utils.get_total_norm(grads)


def check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(
            f"step {step}: the {what} is {value}; stopped before the optimizer step, "
            "the last good checkpoint is untouched (lower the lr, check the data, or use fp32)")


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, info: DistInfo, step: int,
                   clip_apart: list[torch.nn.Module] | None = None, sharded: bool = False) -> float:
    """All-reduce gradients (FSDP2 has already reduce-scattered them when ``sharded``), clip,
    refuse non-finite norms, step, zero. Returns the grad norm.

    ``clip_apart``: clip each of these modules on its own (PPO's actor and critic); the
    returned norm is then the first one's.
    """
    if not sharded:
        all_reduce_grads(model, info)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grads = [[p for p in m.parameters() if p.grad is not None] for m in (clip_apart or [model])]
    totals = [_grad_norm([p.grad for p in part], sharded) for part in grads]
    norms = [_norm_value(total) for total in totals]
    for norm in norms:
        check_finite(norm, "gradient norm", step)
    scale = None
    for part, total, norm in zip(grads, totals, norms):
        if sharded:  # as clip_grad_norm_ does (the norm is a DTensor over the shards)
            torch.nn.utils.clip_grads_with_norm_(part, limit, total)
        elif norm + 1e-6 > limit:  # clip_grad_norm_'s factor min(1, limit / (norm + 1e-6)); never x1.0
            factor = torch.clamp(limit / (total + 1e-6), max=1.0)
            if len(grads) == 1 and optimizer.defaults.get("fused"):
                # the fused step divides each gradient by it as it reads it (in fp32, as GradScaler's scale)
                scale = factor.reciprocal().float()
            else:
                torch._foreach_mul_([p.grad for p in part], factor.to(part[0].grad.device))
    _step(optimizer, scale)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norms[0]


def _step(optimizer, grad_scale: torch.Tensor | None) -> None:
    """``optimizer.step()``; a fused AdamW with ``grad_scale`` divides every gradient by it in its
    kernel (the hook GradScaler uses): clipping then costs no pass of its own over the gradients."""
    if grad_scale is None:
        optimizer.step()
        return
    optimizer.grad_scale = grad_scale
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def _norm_value(norm) -> float:
    """``clip_grad_norm_``'s result as a float (a DTensor under FSDP2: the norm over all shards)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
