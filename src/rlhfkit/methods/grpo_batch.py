"""GRPO's batch between sampling and the update: the rollout container, the group filters and
DAPO's dynamic sampling (more rounds of prompts until the batch has a signal), the batch-level
reward scaling (``scale_rewards=batch``), the high-entropy token filter and the step's rollout
metrics. methods/grpo.py reads top to bottom and calls these.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..rollout.rewards import OutcomeScores
from ..rollout.sampler import Samples, cat_padded, join_samples
from ..train.dist import DistInfo, all_gather_varying
from ..train.loop import reduce_dict
from ..train.run import Run
from .online_rewards import reward_stats

if TYPE_CHECKING:
    from .grpo import GRPOConfig


@dataclass
class Rollout:
    """One batch of scored samples; completion-aligned tensors are (B, C), B = prompts * G."""

    samples: Samples
    outcome: object  # rollout.rewards.OutcomeScores
    advantages: torch.Tensor
    generation_s: float

def informative(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) True where some sample of the group has a non-zero advantage (a learning signal)."""
    return (advantages.abs().sum(-1) > 0).view(-1, group_size).any(-1)


def has_signal(batch: Rollout, cfg: GRPOConfig) -> torch.Tensor:
    """(groups,) the groups DAPO's dynamic sampling keeps (Yu et al. 2025, eq. 11: 0 < correct < G).
    With overlong shaping, the outcome rewards before the length penalty must differ within the
    group (by more than 1e-6): answers all wrong, or all right, are dropped even when their lengths
    differ, as the paper filters on accuracy. Else (and for a process reward) some advantage is
    non-zero."""
    if not cfg.overlong_buffer:
        return informative(batch.advantages, cfg.group_size)
    task = (batch.outcome.rewards - batch.outcome.per_function["overlong"]).view(-1, cfg.group_size)
    spread = task.nan_to_num(float("-inf")).amax(-1) - task.nan_to_num(float("inf")).amin(-1)  # abstained: left out
    return (spread > 1e-6).to(batch.advantages.device)


def scaled_by_batch(batch: Rollout, info: DistInfo, eps: float = 1e-4) -> Rollout:
    """scale_rewards=batch (Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM
    Reasoning", Lite PPO; TRL's ``batch``): the group-centred advantages divided by the standard
    deviation of every reward of the step's batch, over all ranks, rather than of each group's:

        A_i = (r_i - mean(r of its group)) / (std(r of the batch) + eps)

    A sample no reward scored (NaN) is left out of the std, as of its group's mean."""
    rewards = batch.outcome.rewards
    _, std = moments(rewards[~rewards.isnan()], info)
    return replace(batch, advantages=batch.advantages / (std + eps))


def moments(values: torch.Tensor, info: DistInfo) -> tuple[float, float]:
    """The mean and the unbiased standard deviation (as a group's) of ``values`` on every rank."""
    values = values.double()
    total = reduce_dict({"n": values.numel(), "sum": values.sum()}, info)
    mean = total["sum"] / max(total["n"], 1)
    spread = reduce_dict({"squares": ((values - mean) ** 2).sum()}, info)["squares"]
    return mean, (math.sqrt(spread / (total["n"] - 1)) if total["n"] > 1 else 0.0)


def normalised_over_batch(batch: Rollout, info: DistInfo, eps: float = 1e-4,
                          scored: torch.Tensor | None = None) -> Rollout:
    """GDPO's second half (losses/grpo.py ``decoupled_advantages``; TRL's ``normalize_then_sum``):
    the summed, group-normalised rewards s centred and scaled over every sample of the step's batch
    on all ranks, A_i = (s_i - mean(s)) / (std(s) + eps); a sample no reward scored keeps A = 0 and
    stays out of the statistics. Each group's s sums to 0, so mean(s) is 0 but for rounding: an s
    of exactly 0 (a group without a signal) stays 0, not -mean / std, and skip_zero_advantage still
    leaves its group out. ``scored`` (B,) bool: the samples with an advantage to count, where not
    every sample a reward scored has one (RLOO's: none in a group with one scored answer)."""
    present = ~batch.outcome.rewards.isnan().to(batch.advantages.device) if scored is None else scored
    values = batch.advantages[:, 0]  # an outcome advantage is one value over the answer's tokens
    mean, std = moments(values[present], info)
    scaled = torch.where(present & (values != 0), (values - mean) / (std + eps), torch.zeros_like(values))
    return replace(batch, advantages=scaled[:, None].expand_as(batch.advantages).clone())


def join_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Several sampling rounds' rollouts as one batch (completions padded to the longest)."""
    if len(parts) == 1:
        return parts[0]
    advantages = cat_padded([p.advantages for p in parts])
    outcomes = [p.outcome for p in parts]
    errors = {k: sum(o.errors.get(k, 0) for o in outcomes) for o in outcomes for k in o.errors}
    errored = (None if any(o.errored is None for o in outcomes) else torch.cat([o.errored for o in outcomes]))
    messages = {k: v for o in reversed(outcomes) for k, v in o.messages.items()}  # each reward's first
    outcome = OutcomeScores(torch.cat([o.rewards for o in outcomes]),
                            {k: torch.cat([o.per_function[k] for o in outcomes]) for k in outcomes[0].per_function},
                            errors, errored, messages)
    return Rollout(join_samples([p.samples for p in parts], pad_id), outcome, advantages,
                   sum(p.generation_s for p in parts))


@functools.lru_cache(maxsize=1)
def _others(n_rows: int, taken: tuple, step: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed((seed + 1) * 7_919_993 + step)  # apart from BatchOrder's epochs
    excluded = set(taken)
    return [i for i in torch.randperm(n_rows, generator=g).tolist() if i not in excluded]


def more_prompts(n_rows: int, taken: list[int], step: int, seed: int, r: int, size: int) -> list[int]:
    """Dynamic sampling's round ``r`` (>= 1) of step ``step``: ``size`` prompt rows from a
    permutation of the rows of this step's own, without the step's own prompts (``taken``), each
    round the next ones, so that no prompt is drawn twice in a step while the data has rows left
    (then they repeat); a function of the step, which keeps resume exact."""
    others = _others(n_rows, tuple(taken), step, seed) or list(taken)
    start = (r - 1) * size
    return [others[(start + k) % len(others)] for k in range(size)]


def dynamic_batch(run: Run, draw, cfg: GRPOConfig, pad_id: int) -> tuple[Rollout, Rollout, dict]:
    """DAPO's dynamic sampling (Yu et al. 2025, Algorithm 1): sample, drop the groups without a
    signal (``has_signal``), and sample more prompts until the batch holds prompts_per_step
    groups with one.

    ``draw(r)`` samples round r's share of prompts on this rank (round 0 is the step's own batch).
    Every rank fills its share, prompts_per_step / world_size groups, and the ranks sample the same
    number of rounds (the check is summed over them). After ``max_sampling_rounds`` a short batch
    is filled up with groups without a signal, which ``keep_informative_groups`` masks out of the
    loss. Returns every sampled group (for the step's metrics), the batch and its fill metrics."""
    quota = cfg.prompts_per_step // run.info.world_size
    parts = [draw(0)]
    while len(parts) < cfg.max_sampling_rounds:
        kept = sum(int(has_signal(p, cfg).sum()) for p in parts)
        if reduce_dict({"short": float(kept < quota)}, run.info)["short"] == 0:
            break
        parts.append(draw(len(parts)))
    pool = join_rollouts(parts, pad_id)
    signal = has_signal(pool, cfg)
    groups = torch.cat([signal.nonzero().flatten()[:quota], (~signal).nonzero().flatten()])[:quota]
    rows = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size, device=groups.device)).flatten()
    on_cpu = rows.cpu()  # the rewards stay on the CPU where the samples are on a GPU
    outcome = OutcomeScores(pool.outcome.rewards[on_cpu], {k: v[on_cpu] for k, v in pool.outcome.per_function.items()})
    batch = Rollout(pool.samples.rows(rows), outcome, pool.advantages[rows], pool.generation_s)
    filled = reduce_dict({"informative": float(signal[groups].sum()), "rounds": float(len(parts))}, run.info)
    return pool, batch, {"sampling_rounds": filled["rounds"] / run.info.world_size,
                         "informative_fill": filled["informative"] / cfg.prompts_per_step}


def keep_informative_groups(samples: Samples, signal: torch.Tensor, group_size: int) -> Samples:
    """The groups without a signal (``signal``, (groups,) bool: ``has_signal``) leave the loss
    (DAPO's dynamic sampling when its rounds ran out)."""
    return keep_rows(samples, signal.repeat_interleave(group_size))


def keep_rows(samples: Samples, keep: torch.Tensor) -> Samples:
    """The rows where ``keep`` (B,) is False leave the loss: masked out rather than removed, so that
    every rank keeps its rows and runs the same forwards (a rank left with no rows while the others
    run a sharded forward would hang them)."""
    masked = samples.rows(torch.arange(samples.completion_mask.shape[0]))
    masked.completion_mask = samples.completion_mask * keep[:, None].to(samples.completion_mask.device)
    return masked

def high_entropy(entropy: torch.Tensor, mask: torch.Tensor, share: float, info: DistInfo) -> torch.Tensor:
    """(b, C) bool: the real tokens (``mask``) whose entropy is among the top ``share`` of every
    real token of this forward on every rank, at or above their (1 - share) quantile (Wang et al.
    2025, "Beyond the 80/20 Rule": the policy gradient through the high-entropy tokens only; TRL's
    ``top_entropy_quantile``, whose threshold is also per forward, gathered over ranks). With the
    whole per-rank batch in one forward (``train.micro_batch_size`` 0) it is the batch's, as in the
    paper."""
    real = mask.bool()
    everyone = all_gather_varying(entropy[real].float(), info).sort().values
    if everyone.numel() == 0:
        return torch.zeros_like(real)
    at = (everyone.numel() - 1) * (1 - share)  # torch.quantile's linear interpolation, without its 2^24 limit
    low = int(at)
    high = min(low + 1, everyone.numel() - 1)
    threshold = everyone[low] + (at - low) * (everyone[high] - everyone[low])
    return (entropy >= threshold) & real


def all_abstained(outcome: OutcomeScores) -> bool:
    """Whether every reward function returned None for every sample (NaN in ``per_function``)."""
    columns = [v for k, v in outcome.per_function.items() if k not in ("overlong", "process")]
    return bool(columns) and all(bool(torch.isnan(v).all()) for v in columns)


def step_metrics(batch: Rollout, group_size: int, info: DistInfo | None = None) -> dict:
    """The step's rollout metrics. The rewards' and lengths' statistics are the whole batch's,
    gathered from every rank (an average of the ranks' maxima or standard deviations is neither);
    the timings and the share of groups without a signal are this rank's, averaged over ranks."""
    info = info or DistInfo()
    outcome, lengths = batch.outcome, batch.samples.completion_mask.sum(-1).float()
    out, whole = reward_stats(outcome.rewards, outcome.per_function, outcome.errors, info, {"lengths": lengths})
    zero_groups = ~informative(batch.advantages, group_size)  # (groups,) no signal
    out.update({"completion_len_mean": whole["lengths"].mean().item(), "completion_len_max": whole["lengths"].max().item(),
                "tokens_sampled_per_s": lengths.sum().item() / max(batch.generation_s, 1e-9),
                "time_generation_s": batch.generation_s, "zero_advantage_groups": zero_groups.float().mean().item()})
    return out
