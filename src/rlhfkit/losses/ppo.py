"""PPO for language models (InstructGPT stage 3; Ouyang et al. 2022, Ziegler et al. 2019).

Reward of a sampled completion y, per token (SPEC.md stage 3):

    r_t = -beta * (log pi_theta(y_t|.) - log pi_ref(y_t|.))      for every completion token t
    r_T += r_phi(x, y)                                          on the last token

The KL term is the sampled token's log-ratio k1 (the papers'); ``estimator="k3"`` takes Schulman's
k3 instead, pi_ref/pi - log(pi_ref/pi) - 1 (>= 0 on every token, as TRL's ``kl_estimator="k3"``).

GAE (Schulman et al. 2016) over the critic's values, with V = 0 past the last token:

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1},   R_t = A_t + V_t

where t+1 is the next *real* token: a masked position inside a row (a gap, not only right
padding) is skipped, as if the row's real tokens were written next to each other.

Policy loss: -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi_theta / pi_old per token.
Value loss:  0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2).
Both are token means over the batch's completion tokens; pass the global token count
(``num_tokens``) when a batch is split over micro-batches or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grpo import k3_kl
from .policy import clipped_surrogate
from .reduce import masked_mean, masked_sum, token_mean


def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                       beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) per-token rewards: -beta * KL on every completion token, plus the score on the last one.

    ``mask`` marks each completion as a prefix of its row (right padding). Returns (rewards, kl)
    where kl = logprobs - ref_logprobs (k1) or k3_kl(logprobs, ref_logprobs) (``estimator="k3"``)
    on completion tokens (0 elsewhere).
    """
    mask = mask.to(logprobs.dtype)
    kl = (k3_kl(logprobs, ref_logprobs) if estimator == "k3" else logprobs - ref_logprobs) * mask  # (B, T)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of each completion's last token
    rewards = (-beta * kl).scatter_add(1, last[:, None], scores[:, None].to(kl.dtype))
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """(B, T) advantages and returns; rewards and values at masked positions are ignored.

    Masked positions are skipped wherever they are (the recursion carries over them), so a
    row with a gap gives what a loop over its real tokens alone gives; they get advantage 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = real * (delta + gamma * lam * running) + (1 - real) * running
        advantages[:, t] = running * real
        next_value = real * values[:, t] + (1 - real) * next_value
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps: float = 0.2, num_tokens: float | None = None, sample_weights: torch.Tensor | None = None):
    """Clipped surrogate (losses/policy.py), token mean; each token's term times ``sample_weights``
    ((B, T) or (B, 1): pi_old / pi_sampler where another engine drew the samples, losses/grpo.py
    ``sampling_weights``) when given. Returns (loss, metrics)."""
    mask = mask.to(logprobs.dtype)
    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, eps)
    per_token = surrogate.loss if sample_weights is None else surrogate.loss * sample_weights
    loss = token_mean(per_token, mask, num_tokens)
    with torch.no_grad():
        clipped = (surrogate.clipped_low | surrogate.clipped_high).to(mask.dtype)  # the clip changed the gradient
        metrics = {"policy_clip_frac": masked_mean(clipped, mask),
                   "approx_kl": masked_mean((surrogate.ratio - 1) - surrogate.log_ratio, mask)}
        if sample_weights is not None:
            metrics["sampling_weight_mean"] = masked_mean(sample_weights.expand_as(mask), mask)
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               eps_value: float = 0.2, num_tokens: float | None = None):
    """Clipped value loss, token mean. Returns (loss, metrics)."""
    mask = mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -eps_value, eps_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.max(unclipped_error, clipped_error), mask, num_tokens)
    with torch.no_grad():
        metrics = {"value_clip_frac": masked_mean((clipped_error > unclipped_error).to(mask.dtype), mask)}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total=None) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, <= 0 a useless one.
    ``total``: how partial sums become the whole's (masked_whiten's), e.g. over all ranks' tokens."""
    total = total or (lambda sums: sums)
    mask = mask.to(values.dtype)
    residual = returns - values
    count, sum_r, sum_res = total(torch.stack([mask.sum(), masked_sum(returns, mask), masked_sum(residual, mask)]))
    count = count.clamp(min=1)
    centred = torch.stack([masked_sum((returns - sum_r / count) ** 2, mask),
                           masked_sum((residual - sum_res / count) ** 2, mask)])
    var_r, var_res = total(centred) / count
    return 1 - var_res / var_r.clamp(min=1e-8)


@dataclass
class AdaptiveKL:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    beta: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta
