"""The loop the offline methods (SFT, RM, DPO) share: batches -> loss -> optimizer step.

A method hands in an ``Objective``: how to count a micro-batch's denominators (tokens,
pairs, prompts) and how to compute its loss given the *global* totals. The loop sums the
counts over micro-batches and ranks first, so gradient accumulation and multi-process
training give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .dist import DistInfo, all_reduce_sum, barrier, broadcast_params, init_distributed
from .logging import MetricsLogger, progress
from .optim import build_optimizer, build_scheduler, check_finite, optimizer_step


@dataclass(frozen=True)
class Objective:
    counts: Callable[[Any], dict[str, float]]  # micro-batch -> its denominators
    loss: Callable[[Any, Any, dict[str, float]], tuple[torch.Tensor, dict]]  # (model, batch, totals)


@dataclass
class TrainResult:
    steps: int
    metrics: dict = field(default_factory=dict)  # the last step's
    evals: list[dict] = field(default_factory=list)
    stopped_early: bool = False


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
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_out_dir(cfg: TrainConfig, info: DistInfo) -> None:
    """Refuse to write a new run over an old one; ``resume`` needs a complete checkpoint."""
    out = Path(cfg.out_dir)
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise CheckpointError(f"resume=true but {out}/checkpoints holds no complete checkpoint")
    elif complete_checkpoints(out) or (out / "metrics.jsonl").exists():
        raise CheckpointError(f"{out} already holds a run; pass resume=true to continue it or pick another out_dir")
    barrier(info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)


def split_batch(cfg: TrainConfig, info: DistInfo) -> tuple[int, int]:
    """(rows per rank, rows per micro-batch), checking that the global batch divides evenly."""
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must divide evenly over {info.world_size} ranks")
    per_rank = cfg.batch_size // info.world_size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} must be a multiple of micro_batch_size={micro}")
    return per_rank, micro


def reduce_dict(values: dict[str, float | torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Sum a dict of numbers over ranks with one collective."""
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_sum(flat, info)
    return dict(zip(keys, flat.tolist()))


def train_offline(model, examples: list, collate: Callable, objective: Objective, cfg: TrainConfig,
                  config: dict, eval_fn: Callable | None = None) -> TrainResult:
    """Train ``model`` on ``examples`` for ``cfg.max_steps`` optimizer steps.

    ``eval_fn(model) -> dict`` runs every ``cfg.eval_every`` steps and at the end; a returned
    ``stop: True`` ends training there (after a checkpoint).
    """
    info = init_distributed()
    prepare_out_dir(cfg, info)
    seed_everything(cfg.seed)
    broadcast_params(model, info)
    per_rank, micro = split_batch(cfg, info)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    start = 0
    if cfg.resume:
        path = latest_checkpoint(cfg.out_dir)
        start = load_checkpoint(path, model, optimizer, scheduler)["step"]
        if info.is_main:
            print(f"resuming from {path} (step {start} of {cfg.max_steps})", file=sys.stderr)
    order = BatchOrder(len(examples), cfg.batch_size, cfg.seed)
    logger = MetricsLogger(cfg.out_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
    bar = progress(cfg.max_steps, start, desc=Path(cfg.out_dir).name, enabled=info.is_main and cfg.progress)
    result = TrainResult(steps=start)
    for step in range(start, cfg.max_steps):
        rows = order.indices(step)[info.rank::info.world_size]
        batches = [collate([examples[i] for i in rows[j: j + micro]]) for j in range(0, per_rank, micro)]
        totals = reduce_dict(_sum_dicts(objective.counts(b) for b in batches), info)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            with autocast(cfg.dtype):
                loss, metrics = objective.loss(model, batch, totals)
            loss.backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        metrics = reduce_dict(sums, info)
        check_finite(metrics["loss"], "loss", step + 1)
        metrics["grad_norm"] = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm, info, step + 1)
        metrics["lr"] = scheduler.get_last_lr()[0]
        done = step + 1
        result.steps, result.metrics = done, metrics
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            logger.log(done, metrics)
        evaluated = None
        if eval_fn is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            evaluated = eval_fn(model)
            result.evals.append({"step": done, **evaluated})
            logger.log(done, {k: v for k, v in evaluated.items() if k != "stop"}, prefix="eval")
            bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in evaluated.items()
                                                   if isinstance(v, float)))
        stop = bool(evaluated and evaluated.get("stop"))
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or stop:
            if info.is_main:
                save_checkpoint(cfg.out_dir, done, model, optimizer, scheduler, config,
                                extra={"samples_seen": done * cfg.batch_size}, keep=cfg.keep_checkpoints)
            barrier(info)
        if stop:
            result.stopped_early = True
            break
    bar.close()
    logger.close()
    return result


def _sum_dicts(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out
