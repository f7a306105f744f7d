"""The clipped surrogate of PPO (Schulman et al. 2017, eq. 7), shared by PPO and GRPO.

    L_t = -min( rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t ),   rho_t = pi_theta / pi_old

With eps_high = eps_low it is the paper's symmetric clip; eps_high > eps_low is DAPO's
clip-higher. The clip changes the gradient of a token only where the ratio has left the band
in the direction the advantage pushes it: below 1 - eps_low with A < 0, above 1 + eps_high
with A > 0; those are the clip fractions reported.

Two-sided clipping (``delta``; the INTELLECT-2 report, Prime Intellect Team 2025; TRL's
``delta``): where the advantage is negative the ratio term is capped too, so that one token far
above pi_old cannot make an unbounded loss:

    L_t = -min( min(rho_t, delta) A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t ),   delta > 1 + eps_high

(with A_t > 0 the cap never binds there: the clipped term is the smaller already; the tokens it
caps lose their gradient and are not among the clip fractions.)

CISPO (the MiniMax-M1 report, MiniMax 2025) clips the importance weight instead, and keeps every
token's gradient:

    L_t = -sg( min(rho_t, 1 + eps_high) ) A_t log pi_theta(o_t)

(sg: no gradient through it; the paper sets no lower bound, as ScaleRL and TRL, whose
``epsilon_high`` is the cap itself, 1 + eps_high here.)

SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"; TRL's ``sapo``) replaces the hard
clip by a smooth gate of the ratio, with a temperature for positive and one for other advantages:

    L_t = -f(rho_t) A_t,   f(rho) = sigma(tau (rho - 1)) 4 / tau,   tau = tau_pos if A_t > 0 else tau_neg

At rho = 1 its gradient is the plain policy gradient's (sigma'(0) 4 = 1); away from 1 it fades
as sigma' does, faster for the larger tau (the paper's tau_neg > tau_pos damps negative updates more).

VESPO ("Variational Sequence-Level Soft Policy Optimization", arXiv:2602.10693; TRL's ``vespo``,
whose form this is) weighs each answer's policy gradient by a Gamma-shaped function of its whole
importance ratio w = pi_theta(y|x) / pi_old(y|x) (times pi_old / pi_sampler, token by token,
where another engine sampled), in place of a clip:

    L_t = -sg( phi(w) ) A_t log pi_theta(o_t),   phi(w) = e^lambda w^k e^(-lambda w)

with (k, lambda) one pair where A >= 0 and another where A < 0. phi(1) = 1, so on-policy it is the
plain policy gradient; a ratio far below 1 is damped by w^k, one far above by e^(-lambda w). Each
token's log-ratio is clamped to [-20, 20] before the sum, and log w to [log 1e-8, 20], as TRL's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Surrogate:
    loss: torch.Tensor  # (B, T) per-token -min(rho A, clip(rho) A), not yet reduced
    ratio: torch.Tensor  # (B, T) rho, detached
    log_ratio: torch.Tensor  # (B, T) log rho, detached
    clipped_low: torch.Tensor  # (B, T) bool: rho < 1 - eps_low and A < 0
    clipped_high: torch.Tensor  # (B, T) bool: rho > 1 + eps_high and A > 0


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       sequence_mask: torch.Tensor | None = None, total: bool = False) -> torch.Tensor:
    """log rho per token, or with ``sequence_mask`` (B, T) GSPO's in its GSPO-token form: the
    value mean_t log rho of the answer, the gradient each token's own (``clipped_surrogate``).
    ``total``: the value sum_t log rho, the log of the answer's whole ratio pi_theta(y|x) /
    pi_old(y|x) (TRL's RLOO), and each token's gradient |y| times its own, so that a mean over the
    answer's tokens has the value of its one term and the gradient of the whole ratio."""
    log_ratio = logprobs - old_logprobs
    if sequence_mask is None:
        return log_ratio
    m = sequence_mask.to(log_ratio.dtype)
    value, count = (log_ratio.detach() * m).sum(-1, keepdim=True), m.sum(-1, keepdim=True).clamp(min=1)
    if total:
        return value.expand_as(logprobs) + count * (logprobs - logprobs.detach())
    return (value / count).expand_as(logprobs) + logprobs - logprobs.detach()


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float | None = None,
                      sequence_mask: torch.Tensor | None = None, delta: float | None = None,
                      sequence_total: bool = False) -> Surrogate:
    """Per-token clipped surrogate loss and what the clip did; all tensors (B, T).

    ``sequence_mask`` (B, T): GSPO's sequence-level ratio (Zheng et al. 2025, eq. 7) instead of each
    token's, s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(mean_t log rho_t) over the
    masked tokens, in its GSPO-token form (eq. 13): token t carries sg[s_i] pi_t / sg[pi_t], whose
    value is s_i and whose gradient is s_i grad log pi_t, so that a token's own advantage (a process
    reward's) weighs its own gradient; with one advantage per answer it is GSPO's gradient.
    ``delta``: two-sided clipping's cap (module docstring); None: none. ``sequence_total``: the
    answer's whole ratio pi_theta(y_i|x) / pi_old(y_i|x) = exp(sum_t log rho_t) in place of GSPO's
    geometric mean (TRL's RLOO), in the same token form."""
    eps_high = eps_low if eps_high is None else eps_high
    log_ratio = sequence_log_ratio(logprobs, old_logprobs, sequence_mask, sequence_total)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(capped * advantages, clipped * advantages)
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
    return Surrogate(loss, ratio.detach(), log_ratio.detach(), low, high)


def cispo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    eps_high: float = 0.2) -> Surrogate:
    """CISPO's per-token loss (module docstring); all tensors (B, T). ``clipped_high``: the tokens
    whose weight the cap lowered and whose advantage is positive (TRL's ``cispo_clip_ratio``)."""
    log_ratio = (logprobs - old_logprobs).detach()
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=1 + eps_high)
    loss = -weight * advantages * logprobs
    return Surrogate(loss, ratio, log_ratio, torch.zeros_like(ratio, dtype=torch.bool),
                     (ratio > 1 + eps_high) & (advantages > 0))


def sapo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   tau_pos: float = 1.0, tau_neg: float = 1.05,
                   sequence_mask: torch.Tensor | None = None) -> Surrogate:
    """SAPO's per-token loss (module docstring); all tensors (B, T). ``sequence_mask``: GSPO's
    sequence ratio in its GSPO-token form, as ``clipped_surrogate``'s. Nothing is clipped: the
    clip fractions are 0."""
    log_ratio = sequence_log_ratio(logprobs, old_logprobs, sequence_mask)
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, tau_pos, tau_neg).to(ratio.dtype)
    loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return Surrogate(loss, ratio.detach(), log_ratio.detach(), none, none)


def vespo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, gamma_pos: tuple[float, float] = (2.0, 3.0),
                    gamma_neg: tuple[float, float] = (3.0, 2.0),
                    sampling_log_weights: torch.Tensor | None = None) -> tuple[Surrogate, torch.Tensor]:
    """VESPO's per-token loss (module docstring); all tensors (B, T), ``mask`` 1 on answer tokens.
    ``gamma_pos``, ``gamma_neg``: (k, lambda) where A >= 0 and where A < 0. ``sampling_log_weights``
    (B, T): log(pi_old / pi_sampler) of each token (0 elsewhere), in w. Nothing is clipped. Returns
    (the surrogate, phi (B, T), detached)."""
    log_ratio = (logprobs - old_logprobs).detach()
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)  # (B, 1)
    if sampling_log_weights is not None:
        log_w = log_w + (sampling_log_weights.clamp(math.log(1e-8), 20.0) * mask).sum(-1, keepdim=True)
    log_w = log_w.clamp(math.log(1e-8), 20.0)
    positive = advantages >= 0
    k = torch.where(positive, gamma_pos[0], gamma_neg[0]).to(log_w.dtype)
    lam = torch.where(positive, gamma_pos[1], gamma_neg[1]).to(log_w.dtype)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    none = torch.zeros_like(log_ratio, dtype=torch.bool)
    return Surrogate(-phi * advantages * logprobs, log_ratio.exp(), log_ratio, none, none), phi.expand_as(logprobs)
