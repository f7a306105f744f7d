"""On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes", GKD, eq. 2-3; TRL's DistillationTrainer): the student matches the
teacher's next-token distribution at every token of answers the student sampled itself.

With p_s and p_t the student's and the teacher's next-token distributions at one position, both
softmax(logits / T), and the mixture m = (1 - beta) p_s + beta p_t, the generalized Jensen-Shannon
divergence is

    JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m)        0 < beta < 1

and its two ends are the KLs themselves (TRL's convention, the paper's named cases): beta = 0 is
the forward KL(p_t || p_s) (mode covering, what supervised distillation minimises) and beta = 1 the
reverse KL(p_s || p_t) (mode seeking; TRL's default). (As beta -> 0, JSD(beta) / beta -> the forward
KL: the ends are the limits' directions, not their scale.) The loss is the mean over the step's
answer tokens:

    L = sum over answer tokens i of D_beta(p_s,i, p_t,i) / (the step's answer tokens)

The gradient reaches the student's logits z_s only (the teacher has none): with
KL_s = KL(p_s || .) of the token,

    forward KL:  dL/dz_s = (p_s - p_t) / T
    reverse KL:  dL/dz_s = p_s (log p_s - log p_t - KL(p_s || p_t)) / T
    JSD(beta):   dL/dz_s = (1 - beta) p_s (log p_s - log m - KL(p_s || m)) / T

(the beta KL(p_t || m) term's gradient through m cancels against the other's: d/dz of
sum_v (beta p_t + (1 - beta) p_s) log m = 0, since that sum is the mixture's own mass.)
"""

from __future__ import annotations

import math

import torch


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, 0 where p_v is 0 (a token the model rules out: -inf logits). (...,)"""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T), in fp32 at least (bf16 logits are promoted, fp64 kept)."""
    return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """D_beta(p_s, p_t) of each row of (..., V) logits, the distributions softmax(logits / T). (...)

    beta 0: forward KL(p_t || p_s); 1: reverse KL(p_s || p_t); between: the generalized JSD."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float,
                 num_tokens: float) -> tuple[torch.Tensor, dict]:
    """(N, V) logits at N answer tokens (the positions that predict them). Returns (loss, sums):
    the loss is the tokens' divergences summed over ``num_tokens`` (the step's answer tokens on
    every rank: its micro-batches' losses add up to the step's mean); ``sums`` holds detached sums
    over the N tokens of the divergence, the student's entropy and the teacher's."""
    divergence = generalized_jsd(student_logits, teacher_logits, beta, temperature)  # (N,)
    with torch.no_grad():
        log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
        sums = {"divergence": divergence.detach().sum(), "entropy": -_kl(log_s, torch.zeros_like(log_s)).sum(),
                "teacher_entropy": -_kl(log_t, torch.zeros_like(log_t)).sum()}
    return divergence.sum() / num_tokens, sums
