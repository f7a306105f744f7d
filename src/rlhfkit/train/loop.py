"""The loop the offline methods (SFT, RM, PRM, DPO and its kin, KTO) share: batches -> loss ->
optimizer step; its step (``step_on``) is online DPO's too, on the pairs it sampled.

It runs inside the run skeleton (run.py): set-up, checks, cadence and checkpoints are there.

A method hands in an ``Objective``: how to count a micro-batch's denominators (tokens,
pairs, prompts; KTO's also the sums its reference point is the mean of, from forwards without
gradient) and how to compute its loss given the *global* totals. The loop sums the
counts over micro-batches and ranks first, so gradient accumulation and multi-process
training give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data.encode import to_device
from .dist import DistInfo, all_reduce_sum
from .optim import build_optimizer, build_scheduler
from .run import Run, split_batch


@dataclass(frozen=True)
class Objective:
    counts: Callable[[Any], dict[str, float]]  # micro-batch -> its denominators
    loss: Callable[[Any, Any, dict[str, float]], tuple[torch.Tensor, dict]]  # (model, batch, totals)


class BatchOrder:
    """An endless stream of shuffled epochs; step s takes positions [s*B, (s+1)*B).

    No row is dropped (a batch may straddle two epochs) and the position is a function of
    the step alone, which is what makes resume exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
            for old in [e for e in self._perms if e < epoch - 1]:  # steps only move forward: keep two epochs
                del self._perms[old]
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def autocast(dtype: str, device: str = "cpu"):
    """bf16 autocast for a trained forward (master weights and the optimizer stay fp32)."""
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reduce_dict(values: dict[str, float | torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Sum a dict of numbers over ranks with one collective."""
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_sum(flat, info)
    return dict(zip(keys, flat.tolist()))


def accumulate(model, batches: list, objective: Objective, totals: dict, dtype: str,
               device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """Forward and backward every micro-batch; returns the summed loss and metric shares (detached)."""
    model.train()
    loss_sum, sums = torch.zeros(()), {}
    for batch in batches:
        with autocast(dtype, device):
            loss, metrics = objective.loss(model, batch, totals)
        loss.backward()
        loss_sum = loss_sum + loss.detach().float()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
    return loss_sum, sums


def step_on(run: Run, model, batches: list, objective: Objective, idle: list = ()) -> tuple[torch.Tensor, dict, float]:
    """One optimizer step on ``batches`` (this rank's micro-batches, on its device): the loss's
    normalisers summed over every rank's batches first (``objective.counts``), then each
    micro-batch's forward and backward, then the step. ``idle``: batches forwarded at zero weight,
    counted nowhere, so that a rank with fewer (or no) batches of its own runs as many forwards as
    the others (a sharded model's forwards are collectives). Returns (loss, metric shares, grad norm)."""
    counts = _sum_dicts(objective.counts(b) for b in batches) if batches else \
        {k: 0.0 for k in objective.counts(idle[0])}
    totals = reduce_dict(counts, run.info)
    loss, shares = accumulate(model, batches, objective, totals, run.cfg.dtype, run.device)
    if idle:
        def nothing(m, batch, totals):
            value, metrics = objective.loss(m, batch, totals)
            return value * 0.0, {k: v * 0.0 for k, v in metrics.items()}

        _, zeros = accumulate(model, idle, Objective(objective.counts, nothing), totals, run.cfg.dtype, run.device)
        shares = {**zeros, **shares}  # the same metrics on every rank (a rank without batches: 0 each)
    _, grad_norm = run.optimizer_step(loss)
    return loss, shares, grad_norm


def train_offline(run: Run, model, examples: list, collate: Callable, objective: Objective,
                  eval_fn: Callable | None = None, what: str = "rows", after_step: Callable | None = None,
                  kept: dict | None = None) -> Run:
    """Train ``model`` on ``examples`` for ``max_steps`` optimizer steps of ``batch_size`` rows.

    ``eval_fn(model) -> dict`` runs every ``eval_every`` steps and at the end; a returned
    ``stop: True`` ends training there (after a checkpoint). ``what`` the examples are, as said
    with ``train.epochs`` (KTO's are answers: a pair gives two). ``after_step(done)`` runs after
    each optimizer step (``done``: the steps taken), before its checkpoint; ``kept``: untrained
    modules it changes, which the checkpoints hold (``Run.attach``).
    """
    cfg, info = run.cfg, run.info
    per_rank, micro = split_batch(cfg, info)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, run.plan(len(examples), cfg.batch_size, what), cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    run.attach(model, optimizer, scheduler, kept)
    order = BatchOrder(len(examples), cfg.batch_size, cfg.seed)
    evaluate = (lambda: eval_fn(model)) if eval_fn is not None else None
    for step in run.steps(evaluate):
        rows = order.indices(step)[info.rank::info.world_size]
        batches = [to_device(collate([examples[i] for i in rows[j: j + micro]]), run.device)
                   for j in range(0, per_rank, micro)]
        loss, shares, grad_norm = step_on(run, model, batches, objective)
        if after_step is not None:
            after_step(run.done + 1)
        run.step_done(means={"grad_norm": grad_norm}, shares={"loss": loss, **shares}, evaluate=evaluate,
                      state={"samples_seen": run.done * cfg.batch_size + cfg.batch_size})
    return run


def _sum_dicts(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


