"""GRPO (DeepSeekMath): G samples per prompt, group-relative advantages, no critic.

Reads top to bottom, one rollout step at a time: sample G completions per prompt from
pi_old -> score them (outcome or process rewards) -> group advantages -> mu policy updates
on the same samples with the clipped, k3-regularised loss of losses/grpo.py. It calls the
shared optimizer step, checkpoint and logging pieces; it has its own loop because its data
comes from the policy itself.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..data.encode import encode_prompt, prompt_text
from ..data.rows import read_rows
from ..losses.grpo import REDUCTIONS, group_advantages, grpo_loss, process_advantages
from ..rollout.evaluate import exact_match
from ..rollout.rewards import OUTCOME_REWARDS, PROCESS_REWARDS, score_outcomes
from ..rollout.sampler import Samples, completion_logprobs, decode, sample
from ..train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..train.config import TrainConfig, to_dict
from ..train.dist import all_reduce_sum, broadcast_params, init_distributed
from ..train.logging import MetricsLogger, progress
from ..train.loop import BatchOrder, prepare_out_dir, reduce_dict, seed_everything
from ..train.optim import build_optimizer, build_scheduler, check_finite, optimizer_step
from .common import finish, load_policy, say


@dataclass(frozen=True)
class GRPOConfig:
    model: str = ""  # the SFT model
    tokenizer: str | None = None
    train_data: str = ""  # prompts (prompt + fields the rewards read, e.g. answer)
    eval_data: str | None = None  # held-out prompts with answers: greedy exact-match accuracy
    rewards: str = "exact_answer"  # outcome rewards "name[:weight],..." (rollout/rewards.py)
    process_reward: str | None = None  # a process reward name: PRM advantages instead of ORM
    group_size: int = 8  # G
    prompts_per_step: int = 16
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.04  # KL weight; 0 loads no reference model
    eps_low: float = 0.2
    eps_high: float | None = None  # DAPO clip-higher; None = eps_low
    mu: int = 1  # policy updates per batch of samples
    loss_type: str = "grpo"  # grpo (paper) | dapo (token mean) | dr_grpo (constant normaliser)
    scale_std: bool = True  # divide advantages by the group std (Dr. GRPO: false)
    dynamic_sampling: bool = False  # DAPO: drop groups whose advantages are all zero
    reward_errors: str = "raise"  # raise | zero (score 0 and count)
    eval_limit: int = 500
    eval_max_new_tokens: int = 32
    train: TrainConfig = field(default_factory=TrainConfig)


def parse_rewards(spec: str) -> tuple[list, list[float]]:
    functions, weights = [], []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition(":")
        if name not in OUTCOME_REWARDS:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join(OUTCOME_REWARDS)}")
        functions.append(OUTCOME_REWARDS[name])
        weights.append(float(weight) if weight else 1.0)
    return functions, weights


def advantages_for(cfg: GRPOConfig, samples: Samples, texts, prompts, fields, tokenizer, process_fn, outcome):
    """(B, C) advantages: PRM from step rewards, or ORM broadcast over each output's tokens."""
    length = samples.completion_ids.shape[1]
    if process_fn is not None:
        ids = [[t for t, m in zip(row, mask) if m and t != tokenizer.eos_token_id]
               for row, mask in zip(samples.completion_ids.tolist(), samples.completion_mask.tolist())]
        steps = process_fn(prompts, texts, completion_ids=ids, tokenizer=tokenizer, **fields)
        ends = [[e for e, _ in s] for s in steps]
        values = [[float(r) for _, r in s] for s in steps]
        return process_advantages(ends, values, cfg.group_size, length, cfg.scale_std)
    adv = group_advantages(outcome.rewards, cfg.group_size, cfg.scale_std)  # (B,)
    return adv[:, None].expand(-1, length).clone()


def rollout(policy, tokenizer, rows, cfg: GRPOConfig, reward_fns, weights, process_fn):
    """Sample, score and compute advantages for one batch of prompt rows."""
    prompt_ids = [encode_prompt(tokenizer, prompt_text(r, tokenizer), chat="messages" in r.data) for r in rows]
    start = time.time()
    samples = sample(policy, prompt_ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                     top_p=cfg.top_p, num_samples=cfg.group_size)
    gen_time = time.time() - start
    texts = decode(tokenizer, samples)
    prompts = [r.data.get("prompt", "") for r in rows for _ in range(cfg.group_size)]
    keys = sorted({k for r in rows for k in r.data} - {"prompt", "messages"})
    fields = {k: [r.data.get(k) for r in rows for _ in range(cfg.group_size)] for k in keys}
    outcome = score_outcomes(reward_fns, weights, prompts, texts, fields, cfg.reward_errors)
    advantages = advantages_for(cfg, samples, texts, prompts, fields, tokenizer, process_fn, outcome)
    return samples, outcome, advantages, gen_time


def keep_informative_groups(samples: Samples, advantages: torch.Tensor, group_size: int):
    """DAPO's dynamic sampling (filter form): drop groups whose advantages are all zero."""
    per_group = (advantages.abs().sum(-1) > 0).view(-1, group_size).any(-1)  # (groups,)
    keep = per_group.repeat_interleave(group_size)
    fields = {k: getattr(samples, k)[keep] for k in samples.__dataclass_fields__}
    return Samples(**fields), advantages[keep]


def run_grpo(cfg: GRPOConfig, reward_fns: list | None = None, weights: list[float] | None = None,
             process_fn=None) -> dict:
    """Train with GRPO. Python callers may pass their own reward callables."""
    if cfg.loss_type not in REDUCTIONS:
        raise ValueError(f"loss_type must be one of {sorted(REDUCTIONS)}, got {cfg.loss_type!r}")
    if reward_fns is None:
        reward_fns, weights = parse_rewards(cfg.rewards)
    weights = weights or [1.0] * len(reward_fns)
    if process_fn is None and cfg.process_reward:
        process_fn = PROCESS_REWARDS[cfg.process_reward]
    info = init_distributed()
    tc = cfg.train
    prepare_out_dir(tc, info)
    seed_everything(tc.seed + info.rank)  # ranks sample differently
    policy, tokenizer = load_policy(cfg.model, cfg.tokenizer)
    broadcast_params(policy, info)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta != 0 else None
    rows = read_rows(cfg.train_data)
    eval_rows = read_rows(cfg.eval_data)[: cfg.eval_limit] if cfg.eval_data else None
    optimizer = build_optimizer(policy, tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.max_steps * cfg.mu, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
    start = 0
    if tc.resume:
        start = load_checkpoint(latest_checkpoint(tc.out_dir), policy, optimizer, scheduler)["step"]
        say(f"grpo: resuming from step {start}")
    accuracy_before = exact_match(policy, tokenizer, eval_rows, cfg.eval_max_new_tokens)["accuracy"] if eval_rows else None
    order = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed)
    logger = MetricsLogger(tc.out_dir, enabled=info.is_main, tensorboard=tc.tensorboard)
    bar = progress(tc.max_steps, start, desc="grpo", enabled=info.is_main and tc.progress)
    evals, metrics = [], {}
    for step in range(start, tc.max_steps):
        t0 = time.time()
        batch_rows = [rows[i] for i in order.indices(step)[info.rank::info.world_size]]
        samples, outcome, advantages, gen_time = rollout(policy, tokenizer, batch_rows, cfg, reward_fns, weights,
                                                         process_fn)
        zero_groups = (advantages.abs().sum(-1) == 0).view(-1, cfg.group_size).all(-1).float().mean().item()
        if cfg.dynamic_sampling:
            samples, advantages = keep_informative_groups(samples, advantages, cfg.group_size)
        metrics = update(policy, reference, optimizer, scheduler, samples, advantages, cfg, info, step)
        metrics.update(step_metrics(outcome, samples, zero_groups, gen_time, time.time() - t0))
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            logger.log(done, metrics)
        if eval_rows and ((tc.eval_every and done % tc.eval_every == 0) or done == tc.max_steps):
            evals.append({"step": done, **exact_match(policy, tokenizer, eval_rows, cfg.eval_max_new_tokens)})
            logger.log(done, evals[-1], prefix="eval")
            bar.write(f"step {done}: accuracy={evals[-1]['accuracy']:.4f}")
        if info.is_main and ((tc.save_every and done % tc.save_every == 0) or done == tc.max_steps):
            save_checkpoint(tc.out_dir, done, policy, optimizer, scheduler, to_dict(cfg),
                            extra={"prompts_seen": done * cfg.prompts_per_step}, keep=tc.keep_checkpoints)
    bar.close()
    logger.close()
    summary = {"steps": tc.max_steps, "accuracy_before": accuracy_before, "evals": evals,
               "reward_mean": metrics.get("reward_mean")}
    if evals:
        summary["accuracy"] = evals[-1]["accuracy"]
    return finish(policy, tokenizer, cfg, tc.out_dir, summary)


def update(policy, reference, optimizer, scheduler, samples: Samples, advantages, cfg: GRPOConfig, info, step: int):
    """mu optimizer steps on one batch of samples; returns the last iteration's metrics."""
    mask = samples.completion_mask
    counts = reduce_dict({"sequences": mask.shape[0], "tokens": mask.sum().item()}, info)
    ref_logprobs = None
    if reference is not None:
        with torch.no_grad():
            ref_logprobs = completion_logprobs(reference, samples)
    old_logprobs = None
    if cfg.mu > 1:  # pi_old is the policy that sampled, fixed across the mu updates
        with torch.no_grad():
            old_logprobs = completion_logprobs(policy, samples)
    policy.train()
    for _ in range(cfg.mu):
        logprobs, entropy = completion_logprobs(policy, samples, with_entropy=True)
        old = old_logprobs if old_logprobs is not None else logprobs.detach()  # mu = 1: ratio 1 in value only
        loss, stats = grpo_loss(logprobs, old, advantages, mask, ref_logprobs, cfg.beta, cfg.eps_low, cfg.eps_high,
                                REDUCTIONS[cfg.loss_type], counts["sequences"], counts["tokens"], cfg.max_new_tokens)
        loss_value = all_reduce_sum(loss.detach().clone(), info).item()
        check_finite(loss_value, "loss", step + 1)
        loss.backward()
        grad_norm = optimizer_step(policy, optimizer, scheduler, cfg.train.max_grad_norm, info, step + 1)
    n = mask.sum().clamp(min=1)
    out = {k: v.item() for k, v in stats.items()}
    out.update(loss=loss_value, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],
               entropy=((entropy.detach() * mask).sum() / n).item())
    return out


def step_metrics(outcome, samples: Samples, zero_groups: float, gen_time: float, step_time: float) -> dict:
    lengths = samples.completion_mask.sum(-1).float()
    out = {"reward_mean": outcome.rewards.mean().item(), "reward_std": outcome.rewards.std().item(),
           "zero_advantage_groups": zero_groups, "completion_len_mean": lengths.mean().item(),
           "completion_len_max": lengths.max().item(), "tokens_sampled_per_s": lengths.sum().item() / max(gen_time, 1e-9),
           "time_generation_s": gen_time, "time_step_s": step_time}
    for name, column in outcome.per_function.items():
        present = column[~column.isnan()]
        out[f"reward/{name}_mean"] = present.mean().item() if present.numel() else float("nan")
        out[f"reward/{name}_std"] = present.std().item() if present.numel() > 1 else 0.0
    for name, count in outcome.errors.items():
        out[f"reward/{name}_errors"] = count
    return out
